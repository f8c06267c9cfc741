//! Helpers of the daemon tests: a scratch installation, the daemon as a child process, waits.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin!("concatd").to_path_buf()
}

/// A scratch installation: `in/`, `out/`, `data/`, `logs/`, and `rules.yaml`.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new(rule_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["in", "out", "data", "logs", "in2"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        let env = Self { dir };
        env.write_rules(&format!(
            "log_dir: logs\nshutdown_grace: 10s\nrules:\n{}",
            rule("r1", "in", rule_extra)
        ));
        env
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn rules(&self) -> PathBuf {
        self.path("rules.yaml")
    }

    pub fn write_rules(&self, text: &str) {
        let temp = self.path(".rules.yaml.tmp");
        fs::write(&temp, text).unwrap();
        fs::rename(temp, self.rules()).unwrap();
    }

    pub fn data(&self, name: &str, bytes: &[u8]) {
        fs::write(self.path("data").join(name), bytes).unwrap();
    }

    /// Drop a manifest by writing it elsewhere and renaming it in.
    pub fn drop_renamed(&self, folder: &str, name: &str, text: &str) {
        let temp = self.path(folder).join(format!(".{name}.part"));
        fs::write(&temp, text).unwrap();
        fs::rename(temp, self.path(folder).join(name)).unwrap();
    }

    pub fn start(&self) -> Daemon {
        self.start_named("daemon")
    }

    pub fn start_named(&self, label: &str) -> Daemon {
        let stderr = self.path(&format!("{label}.stderr"));
        let child = Command::new(bin())
            .args(["run", "-c"])
            .arg(self.rules())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { child, stderr };
        wait_until(Duration::from_secs(10), || d.log().contains(" ready"));
        d
    }

    pub fn concatd(&self) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.dir.path());
        c
    }

    /// `concatd submit --wait` of `manifest` to rule `r1`, with an optional `--timeout`.
    pub fn submit_wait(&self, manifest: &Path, timeout: Option<&str>) -> std::process::Output {
        let mut c = self.concatd();
        c.args(["submit", "-c", "rules.yaml", "--rule", "r1", "--wait"]);
        if let Some(t) = timeout {
            c.args(["--timeout", t]);
        }
        c.arg(manifest).output().unwrap()
    }
}

pub fn rule(name: &str, watch: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    watch: {watch}\n    output_root: out\n    source_root: data\n{extra}"
    )
}

pub struct Daemon {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Daemon {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Send `sig` ("TERM" or "HUP") at once, with no `kill` process to start first: tests that
    /// stop a job mid-copy race the copy.
    pub fn signal(&self, sig: &str) {
        let sig = match sig {
            "TERM" => rustix::process::Signal::TERM,
            "HUP" => rustix::process::Signal::HUP,
            other => panic!("signal {other} is not used by the tests"),
        };
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child's pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// SIGTERM and wait; the exit code.
    pub fn stop(mut self) -> i32 {
        self.signal("TERM");
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        std::mem::forget(self);
        code
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::mem::forget(self);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The job folders in `<watch>/.work/` (not the daemons' presence files beside them).
pub fn job_dirs(watch: &Path) -> Vec<String> {
    names(&watch.join(".work"))
        .into_iter()
        .filter(|n| watch.join(".work").join(n).is_dir())
        .collect()
}

/// Every result file under `<watch>/done` and `<watch>/failed`.
pub fn results(watch: &Path) -> Vec<Value> {
    let mut all = Vec::new();
    for sub in ["done", "failed"] {
        for n in names(&watch.join(sub)) {
            if n.ends_with(".result.json") {
                let text = fs::read(watch.join(sub).join(n)).unwrap();
                all.push(serde_json::from_slice(&text).unwrap());
            }
        }
    }
    all
}

pub fn count_results(watch: &Path) -> usize {
    ["done", "failed"]
        .iter()
        .map(|s| {
            names(&watch.join(s))
                .iter()
                .filter(|n| n.ends_with(".result.json"))
                .count()
        })
        .sum()
}

pub fn temps_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in walk(dir) {
        let n = e.file_name().unwrap().to_string_lossy().into_owned();
        if n.starts_with(".concatd-") {
            found.push(n);
        }
    }
    found
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A tmpfs of a given size mounted at a folder (root only), unmounted on drop: a real full disk.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount one; `None` when mounting is not possible here.
    pub fn mount(dir: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_owned()))
    }

    /// [`Tmpfs::mount`] for a test that needs it: under CI (which runs as root and must run the
    /// test) a failed mount panics; elsewhere the test is skipped, loudly (`None`).
    pub fn mount_or_skip(dir: &Path, size: &str) -> Option<Self> {
        let mount = Self::mount(dir, size);
        if mount.is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot mount a tmpfs in CI"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        }
        mount
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Assert a command exited with `code`, showing its stdout and stderr when it did not.
pub fn assert_exit(out: &std::process::Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
