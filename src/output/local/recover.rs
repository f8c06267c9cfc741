//! Finishing or undoing, after a crash, a publish that recorded its renames.

use std::ffi::OsStr;

use rustix::io::Errno;

use super::{
    OutputError, OutputTarget, Publish, Renames, sidecar_name, sidecar_temp_name, temp_name,
};

impl OutputTarget {
    /// Finish or undo, after a crash, the publish of job `job_id` that recorded `renames` before
    /// its first rename — decided by the inodes at the output's and the sidecar's names, under the
    /// folder's publish lock. True when the output is published (its sidecar then put in place
    /// if the crash came before that rename); false when the job's output is not there (nothing
    /// of it is visible: it may run again). The job's temporary names are removed either way.
    pub fn recover_publish(
        &self,
        job_id: &str,
        renames: Renames,
        hash: &blake3::Hash,
        how: Publish,
    ) -> Result<bool, OutputError> {
        let _lock = self.lock()?;
        let ours = |name: &OsStr, ino: u64| self.inode_at(name) == Some((renames.dev, ino));
        if !ours(&self.name, renames.output_ino) {
            // The crash came before the output's rename (or the job undid it).
            self.remove_temps(job_id);
            return Ok(false);
        }
        if how.sidecar {
            let b3 = sidecar_name(&self.name);
            let temp = sidecar_temp_name(job_id);
            let in_place = match renames.sidecar_ino {
                Some(ino) => ours(&b3, ino),
                // An older daemon's journal: whatever waits under the temporary name is ours.
                None => self.inode_at(OsStr::new(&temp)).is_none(),
            };
            if !in_place {
                let waiting = match renames.sidecar_ino {
                    Some(ino) => ours(OsStr::new(&temp), ino),
                    None => true,
                };
                if !waiting {
                    // Exchanged out by nothing we know of: write it again.
                    self.write_sidecar_temp(&temp, hash, how.fsync)?;
                }
                match self.place(&temp, &b3, how.overwrite) {
                    Ok(_) => {}
                    Err(Errno::EXIST) => {
                        // Another .b3 appeared, as a live publish would have found: undo.
                        self.unplace(&temp_name(job_id), &self.name, false);
                        self.remove_temps(job_id);
                        return Ok(false);
                    }
                    Err(e) => return Err(self.fail("publishing the .b3 sidecar", e)),
                }
            }
        }
        if how.fsync {
            self.sync_folders(false)?;
        }
        self.remove_temps(job_id);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use rustix::fs::RenameFlags;

    /// Overwrite, crashed after the sidecar's exchange: the earlier files wait under our
    /// temporary names. Recovery keeps the new pair and removes the old one.
    #[test]
    fn recovery_after_an_exchange_keeps_the_new_output_and_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let target = OutputTarget::new(dir.path(), "o.bin").unwrap();
        std::fs::write(dir.path().join("o.bin"), b"old").unwrap();
        std::fs::write(dir.path().join("o.bin.b3"), b"old b3").unwrap();
        let hash = blake3::hash(b"new");
        let how = Publish {
            overwrite: true,
            fsync: false,
            sidecar: true,
        };
        // The state a crash after both exchanges leaves: the new pair in place, the old one under
        // our temporary names.
        let ino = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap();
        std::fs::write(dir.path().join(temp_name("j1")), b"new").unwrap();
        let b3_ino = target
            .write_sidecar_temp(&sidecar_temp_name("j1"), &hash, false)
            .unwrap();
        use std::os::unix::fs::MetadataExt;
        let renames = Renames {
            dev: ino(&temp_name("j1")).dev(),
            output_ino: ino(&temp_name("j1")).ino(),
            sidecar_ino: Some(b3_ino),
        };
        for (temp, name) in [
            (temp_name("j1"), "o.bin"),
            (sidecar_temp_name("j1"), "o.bin.b3"),
        ] {
            rustix::fs::renameat_with(
                &target.dir,
                temp.as_str(),
                &target.dir,
                name,
                RenameFlags::EXCHANGE,
            )
            .unwrap();
        }
        assert!(target.recover_publish("j1", renames, &hash, how).unwrap());
        assert_eq!(std::fs::read(dir.path().join("o.bin")).unwrap(), b"new");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("o.bin.b3")).unwrap(),
            crate::checksum::sidecar_line(&hash, "o.bin")
        );
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["o.bin", "o.bin.b3"]);
    }

    #[test]
    fn publish_creates_parents_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let target = OutputTarget::new(dir.path(), "a/b/out.bin").unwrap();
        let hash = blake3::hash(b"");
        let how = Publish {
            overwrite: false,
            fsync: true,
            sidecar: true,
        };
        target
            .create_temp("j1", 0)
            .unwrap()
            .publish(&hash, how, |_| Ok::<(), OutputError>(()))
            .unwrap();
        assert!(dir.path().join("a/b/out.bin.b3").exists());
        let err = target
            .create_temp("j2", 0)
            .unwrap()
            .publish(&hash, how, |_| Ok::<(), OutputError>(()))
            .unwrap_err();
        assert!(matches!(err, OutputError::Exists { .. }));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("a/b")).unwrap().collect();
        assert_eq!(left.len(), 2, "temp files were removed");
    }
}
