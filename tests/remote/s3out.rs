//! S3 outputs end to end: `output_root: s3://bkt/out/` against moto on loopback, through the real
//! binary (`once`, `plan`, and the daemon for crashes). Every object is fetched back and compared
//! byte for byte with the expected concatenation; requests are counted in moto's own request log.

use super::*;

/// moto with its request log kept (werkzeug writes one line per request to stderr).
struct Store {
    moto: super::s3::Moto,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

use super::s3::AWS_ENV;

const MIB: usize = 1 << 20;

impl Store {
    fn start() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let moto = super::s3::start_moto_logging(std::fs::File::create(&log).unwrap().into())?;
        let store = Store {
            moto,
            log,
            _dir: dir,
        };
        store.py("s3.create_bucket(Bucket='bkt')");
        Some(store)
    }

    /// Run Python with `s3` a boto3 client of this store; its stdout.
    fn py(&self, code: &str) -> String {
        let script = format!(
            "import boto3, sys\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test')\n{code}\n",
            self.moto.endpoint
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// PutObject with a full-object CRC64NVME, as current AWS SDKs write by default.
    fn put(&self, key: &str, bytes: &[u8]) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        self.py(&format!(
            "s3.put_object(Bucket='bkt', Key='{key}', Body=open('{}', 'rb').read(), ChecksumAlgorithm='CRC64NVME')",
            f.path().display()
        ));
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let f = tempfile::NamedTempFile::new().unwrap();
        let found = self.py(&format!(
            "try:\n    open('{p}', 'wb').write(s3.get_object(Bucket='bkt', Key='{key}')['Body'].read()); print('yes')\nexcept s3.exceptions.NoSuchKey:\n    print('no')",
            p = f.path().display()
        ));
        (found.trim() == "yes").then(|| std::fs::read(f.path()).unwrap())
    }

    /// The store's (ETag, full-object CRC64NVME) of `key`.
    fn head(&self, key: &str) -> (String, String) {
        let out = self.py(&format!(
            "h = s3.head_object(Bucket='bkt', Key='{key}', ChecksumMode='ENABLED'); print(h['ETag']); print(h.get('ChecksumCRC64NVME', ''))"
        ));
        let mut lines = out.lines();
        (
            lines.next().unwrap().to_owned(),
            lines.next().unwrap_or_default().to_owned(),
        )
    }

    /// Multipart uploads in progress in the bucket.
    fn uploads(&self) -> usize {
        self.py("print(len(s3.list_multipart_uploads(Bucket='bkt').get('Uploads', [])))")
            .trim()
            .parse()
            .unwrap()
    }

    /// CreateMultipartUpload requests so far.
    fn creates(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"POST ") && l.contains("?uploads HTTP"))
            .count()
    }

    /// Requests of moto's log matching `what` (e.g. `GET /bkt/data/`).
    fn requests(&self, what: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }
}

/// A folder with a rules file whose one rule `r` writes to `s3://bkt/out/`.
struct S3Job {
    dir: tempfile::TempDir,
}

impl S3Job {
    fn new(store: &Store, extra_urls: &[String], extra: &str) -> Self {
        Self::with_endpoint(&store.moto.endpoint, extra_urls, extra)
    }

    /// The rule reaching the store at `endpoint` (a proxy in front of moto, say).
    fn with_endpoint(endpoint: &str, extra_urls: &[String], extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["in", "src"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let mut urls = vec!["\"s3://bkt/data/\"".to_owned()];
        urls.extend(extra_urls.iter().map(|u| format!("\"{u}\"")));
        let rules = format!(
            "log_dir: logs\nrules:\n  - name: r\n    watch: in\n    output_root: s3://bkt/out/\n    source_root: src\n    allow:\n      urls: [{}]\n    s3:\n      endpoint: {}\n      region: us-east-1\n      path_style: true\n    remote:\n      connect_timeout: 2s\n      idle_timeout: 20s\n      attempts: 2\n      backoff: 10ms\n{extra}",
            urls.join(", "),
            endpoint
        );
        std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
        S3Job { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn manifest(&self, body: Value) -> PathBuf {
        let path = self.path("m.json");
        std::fs::write(&path, body.to_string()).unwrap();
        path
    }

    fn concatd(&self, args: &[&str], manifest: &Path) -> std::process::Output {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin!("concatd"));
        c.args(args)
            .arg("-c")
            .arg(self.path("rules.yaml"))
            .arg("--rule")
            .arg("r")
            .arg(manifest)
            .envs(AWS_ENV);
        c.output().unwrap()
    }

    fn once(&self, body: Value) -> Value {
        let m = self.manifest(body);
        let out = self.concatd(&["once"], &m);
        parse_result(&out.stdout, &out.stderr)
    }

    fn plan(&self, body: Value) -> Value {
        let m = self.manifest(body);
        let out = self.concatd(&["plan", "--json"], &m);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `plan --json` of a manifest it must refuse (exit 1): the refusal.
    fn plan_refused(&self, body: Value) -> Value {
        let m = self.manifest(body);
        let out = self.concatd(&["plan", "--json"], &m);
        assert_eq!(out.status.code(), Some(1));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The parts of a `plan --json` document.
fn parts(plan: &Value) -> &Vec<Value> {
    plan["parts"]["items"].as_array().unwrap()
}

/// Every part but the last is within S3's limits, and the parts cover the output once, in order.
fn check_parts(plan: &Value) {
    let items = parts(plan);
    let mut at = 0;
    for (i, p) in items.iter().enumerate() {
        assert_eq!(p["output_offset"], at, "{plan}");
        let len = p["length"].as_u64().unwrap();
        if i + 1 < items.len() {
            assert!(len >= 5 << 20, "part {i} of {len} bytes: {plan}");
        }
        assert!(len <= 5 << 30);
        at += len;
    }
    assert_eq!(at, plan["size"].as_u64().unwrap());
}

#[test]
fn s3_to_s3_is_copied_inside_the_store_with_no_get() {
    let Some(store) = Store::start() else {
        return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
    };
    let objects: Vec<Vec<u8>> = (0..3).map(|i| data(6 * MIB, 40 + i)).collect();
    for (i, o) in objects.iter().enumerate() {
        store.put(&format!("data/o{i}.bin"), o);
    }
    let job = S3Job::new(&store, &[], "");
    let manifest = serde_json::json!({"output": "day/merged.bin", "sources":
        ["s3://bkt/data/o0.bin", "s3://bkt/data/o1.bin", "s3://bkt/data/o2.bin"]});

    let plan = job.plan(manifest.clone());
    assert_eq!(plan["parts"]["target"], "s3_multipart", "{plan}");
    assert_eq!(plan["parts"]["count"], 3, "{plan}");
    assert_eq!(plan["parts"]["bytes_through_host"], 0, "{plan}");
    assert_eq!(plan["parts"]["copied_bytes"], 18 * MIB, "{plan}");
    assert!(parts(&plan).iter().all(|p| p["op"] == "copy"), "{plan}");
    assert_eq!(plan["output"], "s3://bkt/out/day/merged.bin");
    check_parts(&plan);
    assert_eq!(
        store.requests("POST /bkt/out/"),
        0,
        "plan created an upload"
    );

    let r = job.once(manifest);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["output"], "s3://bkt/out/day/merged.bin");
    assert_eq!(r["copied_bytes"], 18 * MIB, "{r}");
    assert_eq!(r["uploaded_bytes"], 0, "{r}");
    assert!(
        r.get("blake3").is_none(),
        "no byte passed, verify auto: {r}"
    );
    // Not a single byte of a source through this host.
    assert_eq!(store.requests("GET /bkt/data/"), 0, "a source was read");
    assert_eq!(store.requests("UploadPartCopy"), 3);
    let want: Vec<u8> = objects.concat();
    assert!(
        store.get("out/day/merged.bin").unwrap() == want,
        "object differs"
    );
    let (etag, crc) = store.head("out/day/merged.bin");
    assert_eq!(r["etag"], etag, "{r}");
    assert!(!crc.is_empty(), "moto kept no CRC64NVME");
    assert_eq!(r["crc64nvme"], crc, "{r}");
    assert_eq!(store.uploads(), 0);
    assert!(
        store.get("out/day/merged.bin.b3").is_none(),
        "a .b3 without a BLAKE3"
    );
}

#[test]
fn mixed_local_http_and_s3_with_read_back_and_a_range_across_parts() {
    let Some(store) = Store::start() else {
        return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
    };
    let server = Server::start();
    let local = data(MIB + 12_345, 1);
    let web = data(300_001, 2);
    let small = data(1000, 3);
    let big = data(12 * MIB, 4);
    store.put("data/small.bin", &small);
    store.put("data/big.bin", &big);
    server.put("web.bin", web.clone());
    let job = S3Job::new(&store, &[server.url("ok/")], "    verify: read_back\n");
    std::fs::write(job.path("src/local.bin"), &local).unwrap();
    let manifest = serde_json::json!({"output": "mix.bin", "sources": [
        "local.bin",
        server.url("ok/web.bin"),
        "s3://bkt/data/small.bin",
        {"url": "s3://bkt/data/big.bin", "offset": 777, "length": 10 * MIB},
        "s3://bkt/data/small.bin",
    ]});
    let mut want = local.clone();
    want.extend_from_slice(&web);
    want.extend_from_slice(&small);
    want.extend_from_slice(&big[777..777 + 10 * MIB]);
    want.extend_from_slice(&small);

    let plan = job.plan(manifest.clone());
    check_parts(&plan);
    assert_eq!(plan["parts"]["blake3_known"], true, "{plan}");
    let items = parts(&plan);
    assert_eq!(items[0]["op"], "upload", "{plan}");
    assert!(items.iter().any(|p| p["op"] == "copy"), "{plan}");
    // The ranged source lies in more than one part: the upload borrowed its head to reach 5 MiB.
    let holding_4 = items
        .iter()
        .filter(|p| {
            p["sources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["number"] == 4)
        })
        .count();
    assert!(holding_4 >= 2, "{plan}");
    let through: u64 = items
        .iter()
        .map(|p| p["bytes_through_host"].as_u64().unwrap())
        .sum();
    assert_eq!(plan["parts"]["bytes_through_host"], through);

    let r = job.once(manifest);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["size"], want.len(), "{r}");
    assert_eq!(
        r["uploaded_bytes"], plan["parts"]["bytes_through_host"],
        "{r}"
    );
    assert_eq!(r["copied_bytes"], plan["parts"]["copied_bytes"], "{r}");
    let got = store.get("out/mix.bin").unwrap();
    assert!(got == want, "object differs");
    assert_eq!(r["blake3"], b3(&got), "{r}");
    let sidecar = store.get("out/mix.bin.b3").unwrap();
    assert_eq!(
        String::from_utf8(sidecar).unwrap(),
        format!("{}  mix.bin\n", b3(&want))
    );
    // A ranged copy breaks the combination of stored checksums: no crc64nvme is claimed.
    assert!(r.get("crc64nvme").is_none(), "{r}");
    assert_eq!(store.head("out/mix.bin").0, r["etag"].as_str().unwrap());
    assert_eq!(store.uploads(), 0);
}

#[test]
fn small_objects_are_coalesced_into_uploaded_parts() {
    let Some(store) = Store::start() else {
        return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
    };
    let objects: Vec<Vec<u8>> = (0..9).map(|i| data(MIB + 1000 * i, 60 + i as u8)).collect();
    let mut sources = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        store.put(&format!("data/s{i}.bin"), o);
        sources.push(format!("s3://bkt/data/s{i}.bin"));
    }
    let job = S3Job::new(&store, &[], "");
    let manifest = serde_json::json!({"output": "small.bin", "sources": sources});
    let plan = job.plan(manifest.clone());
    check_parts(&plan);
    let n = plan["parts"]["count"].as_u64().unwrap();
    assert!(n < 9, "not coalesced: {plan}");
    let uploads = parts(&plan).iter().filter(|p| p["op"] == "upload").count();
    assert!(uploads >= 1, "{plan}");
    let r = job.once(manifest);
    assert_eq!(r["status"], "succeeded", "{r}");
    let want = objects.concat();
    let got = store.get("out/small.bin").unwrap();
    assert!(got == want, "object differs");
    assert_eq!(
        r["uploaded_bytes"], plan["parts"]["bytes_through_host"],
        "{r}"
    );
    assert_eq!(store.requests("x-id=UploadPart&"), uploads);
    // Uploaded CRCs combined with the stored CRC of any object copied whole: the store's own.
    assert_eq!(plan["parts"]["crc64nvme_known"], true, "{plan}");
    assert_eq!(r["crc64nvme"], store.head("out/small.bin").1, "{r}");
    if r["uploaded_bytes"] == want.len() {
        assert_eq!(r["blake3"], b3(&want), "{r}");
        let sidecar = String::from_utf8(store.get("out/small.bin.b3").unwrap()).unwrap();
        assert_eq!(sidecar, format!("{}  small.bin\n", b3(&want)));
    } else {
        assert!(r.get("blake3").is_none(), "{r}");
        assert!(store.get("out/small.bin.b3").is_none());
    }
}

#[test]
fn overwrite_false_refuses_and_keeps_the_old_object() {
    let Some(store) = Store::start() else {
        return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
    };
    let server = Server::start();
    let o = data(6 * MIB, 7);
    store.put("data/o.bin", &o);
    store.put("out/taken.bin", b"the old object");
    let tail = data(700, 8);
    server.put("tail.bin", tail.clone());
    let job = S3Job::new(&store, &[server.url("trickle/")], "");

    // Seen before any upload: refused at once.
    let r =
        job.once(serde_json::json!({"output": "taken.bin", "sources": ["s3://bkt/data/o.bin"]}));
    assert_eq!(r["error"]["kind"], "output_exists", "{r}");
    assert_eq!(store.get("out/taken.bin").unwrap(), b"the old object");
    assert_eq!(store.creates(), 0);
    let refused = job.plan_refused(
        serde_json::json!({"output": "taken.bin", "sources": ["s3://bkt/data/o.bin"]}),
    );
    assert_eq!(refused["error"]["kind"], "output_exists", "{refused}");

    // Appearing while the job runs (its last source trickles for 7 s, longer than the SDK's
    // default 5 s stall grace, so its bytes must flow into the part as they come): the
    // conditional completion answers 412, the job fails output_exists, the racing object stays.
    let m = job.manifest(serde_json::json!({"output": "race.bin", "sources":
        ["s3://bkt/data/o.bin", server.url("trickle/tail.bin")]}));
    let mut c = Command::new(assert_cmd::cargo::cargo_bin!("concatd"));
    c.args(["once", "-c"])
        .arg(job.path("rules.yaml"))
        .args(["--rule", "r"])
        .arg(&m)
        .envs(AWS_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.requests("UploadPartCopy") == 0 {
        assert!(Instant::now() < deadline, "no copy part started");
        std::thread::sleep(Duration::from_millis(20));
    }
    store.put("out/race.bin", b"the racing writer");
    let out = child.wait_with_output().unwrap();
    let r = parse_result(&out.stdout, &out.stderr);
    assert_eq!(r["error"]["kind"], "output_exists", "{r}");
    assert_eq!(store.get("out/race.bin").unwrap(), b"the racing writer");
    assert_eq!(store.uploads(), 0, "the refused upload was left billing");

    // A `.b3` alone at the key of a job that will write one (every byte passes through): plan
    // and run both refuse, naming it.
    store.put("out/side.bin.b3", b"0000  side.bin\n");
    let side =
        serde_json::json!({"output": "side.bin", "sources": [server.url("trickle/tail.bin")]});
    let refused = job.plan_refused(side.clone());
    assert_eq!(refused["error"]["kind"], "output_exists", "{refused}");
    let r = job.once(side);
    assert_eq!(r["error"]["kind"], "output_exists", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("side.bin.b3"),
        "{r}"
    );

    // With overwrite the old object is replaced, and the old object's `.b3` goes with it: the
    // new one is copied inside the store, so no BLAKE3 of it is known to replace the `.b3`.
    store.put("out/taken.bin.b3", b"0000  taken.bin\n");
    let r = job.once(serde_json::json!({"output": "taken.bin", "overwrite": true,
        "sources": ["s3://bkt/data/o.bin"]}));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(store.get("out/taken.bin").unwrap() == o);
    assert!(r.get("blake3").is_none(), "{r}");
    assert!(
        store.get("out/taken.bin.b3").is_none(),
        "a stale .b3 was left"
    );
}

#[test]
fn failures_leave_no_upload_and_no_object() {
    let Some(store) = Store::start() else {
        return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
    };
    let server = Server::start();
    let o = data(6 * MIB, 9);
    store.put("data/o.bin", &o);
    server.put("x.bin", data(200_000, 10));
    let job = S3Job::new(
        &store,
        &[server.url("lie/")],
        "    max_output_size: 10MiB\n",
    );

    // Past max_output_size: refused before any upload.
    let r = job.once(serde_json::json!({"output": "f.bin", "sources":
        ["s3://bkt/data/o.bin", "s3://bkt/data/o.bin", server.url("lie/x.bin")]}));
    assert_eq!(r["error"]["kind"], "too_large", "{r}");
    assert_eq!(store.creates(), 0, "too_large is found before any upload");
    let refused = job.plan_refused(serde_json::json!({"output": "f.bin", "sources":
        ["s3://bkt/data/o.bin", "s3://bkt/data/o.bin"]}));
    assert_eq!(refused["error"]["kind"], "too_large", "{refused}");

    // A source failing after the upload was created (its server sends half the bytes it
    // announces): the job fails remote_failed and aborts the upload.
    let r = job.once(serde_json::json!({"output": "f.bin", "sources":
        ["s3://bkt/data/o.bin", server.url("lie/x.bin")]}));
    assert_eq!(r["error"]["kind"], "remote_failed", "{r}");
    assert_eq!(store.creates(), 1, "{r}");
    assert_eq!(store.uploads(), 0, "a failed job left an upload billing");
    assert!(store.get("out/f.bin").is_none());

    // expect.blake3 implies read_back: a mismatch is found before the completion.
    let r = job.once(
        serde_json::json!({"output": "f.bin", "sources": ["s3://bkt/data/o.bin"],
        "expect": {"blake3": b3(b"something else")}}),
    );
    assert_eq!(r["error"]["kind"], "checksum_mismatch", "{r}");
    assert!(
        store.get("out/f.bin").is_none(),
        "a wrong object was published"
    );
    assert_eq!(store.uploads(), 0);
    let r = job.once(
        serde_json::json!({"output": "f.bin", "sources": ["s3://bkt/data/o.bin"],
        "expect": {"blake3": b3(&o)}}),
    );
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["blake3"], b3(&o), "{r}");

    // Keys that leave the prefix or are not plain are refused before any request.
    for bad in ["../x.bin", "a//b.bin", "/abs.bin"] {
        let r = job.once(serde_json::json!({"output": bad, "sources": ["s3://bkt/data/o.bin"]}));
        assert_eq!(r["error"]["kind"], "output_not_allowed", "{bad}: {r}");
    }
    let long = "k".repeat(1100);
    let r = job.once(serde_json::json!({"output": long, "sources": ["s3://bkt/data/o.bin"]}));
    assert_eq!(r["error"]["kind"], "output_not_allowed", "{r}");
}

#[test]
fn check_validates_s3_output_roots_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: s3://Bad_Bucket/x/\n    verify: always\n  - name: b\n    watch: in2\n    output_root: s3://bkt/a//b/\n",
    )
    .unwrap();
    // `concatd check`: its exit code, and what it printed.
    let check = || {
        let out = Command::new(assert_cmd::cargo::cargo_bin!("concatd"))
            .args(["check", "-c"])
            .arg(&rules)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.code(), text)
    };
    let (code, text) = check();
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("rule 'a': key 'output_root'"), "{text}");
    assert!(
        text.contains("rule 'a': key 'verify': 'always' is not one of auto, read_back"),
        "{text}"
    );
    assert!(text.contains("rule 'b': key 'output_root'"), "{text}");
    std::fs::create_dir(dir.path().join("in2")).unwrap();
    std::fs::write(
        &rules,
        "log_dir: logs\nrules:\n  - name: a\n    watch: in\n    output_root: s3://bkt/out\n    verify: read_back\n",
    )
    .unwrap();
    let (code, text) = check();
    assert_eq!(code, Some(0), "{text}");
}

/// Uploads under the prefix that no job owns are aborted by the daemon's sweep.
#[test]
fn the_daemon_aborts_orphaned_uploads_under_its_prefix() {
    let Some(store) = Store::start() else {
        return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
    };
    store.py("s3.create_multipart_upload(Bucket='bkt', Key='out/orphan.bin')");
    store.py("s3.create_multipart_upload(Bucket='bkt', Key='elsewhere/not-ours.bin')");
    assert_eq!(store.uploads(), 2);
    let job = S3Job::new(&store, &[], "");
    let mut daemon = Command::new(assert_cmd::cargo::cargo_bin!("concatd"))
        .args(["run", "-c"])
        .arg(job.path("rules.yaml"))
        .envs(AWS_ENV)
        .env("CONCATD_S3_ORPHAN_GRACE", "0s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.uploads() != 1 {
        assert!(Instant::now() < deadline, "the orphan was not aborted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = store.py("print(s3.list_multipart_uploads(Bucket='bkt')['Uploads'][0]['Key'])");
    assert_eq!(
        left.trim(),
        "elsewhere/not-ours.bin",
        "outside the prefix: not ours"
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// kill -9 at each step of an S3 output, then a restart: exactly one result, succeeded, the
/// object byte-correct, the very upload the first run created completed, none left billing.
#[cfg(feature = "crash-points")]
mod crash {
    use super::*;

    fn daemon(job: &S3Job, crash_at: Option<&str>, stderr: &Path) -> std::process::Child {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin!("concatd"));
        c.args(["run", "-c"])
            .arg(job.path("rules.yaml"))
            .envs(AWS_ENV)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap());
        if let Some(p) = crash_at {
            c.env("CONCATD_CRASH_AT", p);
        }
        c.spawn().unwrap()
    }

    fn results(job: &S3Job) -> Vec<Value> {
        let mut all = Vec::new();
        for folder in ["in/done", "in/failed"] {
            for e in std::fs::read_dir(job.path(folder))
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".result.json") {
                    all.push(serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap());
                }
            }
        }
        all
    }

    fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn crash_then_restart(point: &str) {
        let Some(store) = Store::start() else {
            return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
        };
        let (a, b) = (data(6 * MIB, 21), data(6 * MIB, 22));
        store.put("data/a.bin", &a);
        store.put("data/b.bin", &b);
        // 12 MiB from a local file: two uploaded parts for the crash mid-parts to fall between.
        let local = data(12 * MIB, 23);
        let job = S3Job::new(&store, &[], "    verify: read_back\n");
        std::fs::write(job.path("src/l.bin"), &local).unwrap();
        let want = [local.clone(), a.clone(), b.clone()].concat();
        let first = job.path("first.stderr");
        let mut child = daemon(&job, Some(point), &first);
        let log = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        wait_for("ready", Duration::from_secs(20), || {
            log(&first).contains(" ready")
        });
        let m = serde_json::json!({"output": "crash.bin",
            "sources": ["l.bin", "s3://bkt/data/a.bin", "s3://bkt/data/b.bin"]});
        std::fs::write(job.path("in/.m.json.tmp"), m.to_string()).unwrap();
        std::fs::rename(job.path("in/.m.json.tmp"), job.path("in/m.json")).unwrap();
        let status = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{point}: no crash: {}", log(&first));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        assert!(!status.success(), "{point}");
        let name = point.split('@').next().unwrap();
        assert!(
            log(&first).contains(&format!("crash point {name}")),
            "{point}: {}",
            log(&first)
        );
        assert!(
            results(&job).is_empty(),
            "{point}: a result before the restart"
        );
        let created = store.creates();
        assert_eq!(created, 1, "{point}");

        let second = job.path("second.stderr");
        let mut child = daemon(&job, None, &second);
        wait_for("the result", Duration::from_secs(30), || {
            !results(&job).is_empty()
        });
        let _ = child.kill();
        let _ = child.wait();
        let all = results(&job);
        assert_eq!(all.len(), 1, "{point}: {all:?}");
        let r = &all[0];
        assert_eq!(r["status"], "succeeded", "{point}: {r}\n{}", log(&second));
        let got = store.get("out/crash.bin").unwrap();
        assert!(got == want, "{point}: object differs");
        assert_eq!(r["blake3"], b3(&want), "{point}: {r}");
        let sidecar = store.get("out/crash.bin.b3").map(String::from_utf8);
        assert_eq!(
            sidecar,
            Some(Ok(format!("{}  crash.bin\n", b3(&want)))),
            "{point}"
        );
        assert_eq!(r["etag"], store.head("out/crash.bin").0, "{point}: {r}");
        assert_eq!(store.uploads(), 0, "{point}: an upload left billing");
        // The restart resumed (or recognised) the first run's upload: no second one created.
        assert_eq!(store.creates(), 1, "{point}: {}", log(&second));
        let resumed = log(&second);
        match name {
            "s3-after-complete" => assert!(resumed.contains("recognised by its ETag"), "{resumed}"),
            _ => assert!(
                resumed.contains("resuming the recorded upload"),
                "{resumed}"
            ),
        }
    }

    #[test]
    fn crash_after_create() {
        crash_then_restart("s3-created");
    }

    #[test]
    fn crash_mid_parts() {
        crash_then_restart("s3-parts@60%");
    }

    #[test]
    fn crash_before_complete() {
        crash_then_restart("s3-before-complete");
    }

    #[test]
    fn crash_after_complete() {
        crash_then_restart("s3-after-complete");
    }
}

/// A TCP proxy in front of moto that cuts the first connection carrying an `UploadPart` request
/// once 1 MiB of it has passed, mid-body: the part's upload fails while concatd still streams it.
struct CutProxy {
    endpoint: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CutProxy {
    fn start(upstream: &str) -> Self {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Answers flow back untouched.
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                });
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut tail: Vec<u8> = Vec::new(); // the last bytes seen, for a split match
                    let mut left: Option<usize> = None; // bytes to pass before the cut
                    loop {
                        let n = match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if left.is_none() && !flag.load(Ordering::SeqCst) {
                            tail.extend_from_slice(&buf[..n]);
                            let hit = tail.windows(11).any(|w| w == b"partNumber=")
                                && tail.windows(4).any(|w| w == b"PUT ")
                                && !tail
                                    .windows(19)
                                    .any(|w| w.eq_ignore_ascii_case(b"x-amz-copy-source: "));
                            if hit && !flag.swap(true, Ordering::SeqCst) {
                                left = Some(1 << 20);
                            }
                            let keep = tail.len().saturating_sub(4096);
                            tail.drain(..keep);
                        }
                        if let Some(l) = left.as_mut() {
                            if n >= *l {
                                let _ = s_out.write_all(&buf[..*l]);
                                let _ = s_out.shutdown(std::net::Shutdown::Both);
                                let _ = c_in.shutdown(std::net::Shutdown::Both);
                                break;
                            }
                            *l -= n;
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        CutProxy { endpoint, cut }
    }
}

/// An uploaded part whose upload fails mid-body (the connection cut after 1 MiB of it) is sent
/// again, and the output's BLAKE3, `.b3` and CRC64NVME still cover every byte of it: the part is
/// read to its end the first time even though its body was closed.
#[test]
fn a_part_cut_mid_body_is_sent_again_and_hashed_whole() {
    let Some(store) = Store::start() else {
        return skip_outside_ci("moto_server is not installed (pip install 'moto[server]')");
    };
    let proxy = CutProxy::start(&store.moto.endpoint);
    let job = S3Job::with_endpoint(&proxy.endpoint, &[], "");
    let want = data(12 * MIB, 21);
    std::fs::write(job.path("src/big.bin"), &want).unwrap();
    let r = job.once(serde_json::json!({"output": "cut.bin", "sources": ["big.bin"]}));
    assert!(
        proxy.cut.load(std::sync::atomic::Ordering::SeqCst),
        "no UploadPart was cut"
    );
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(
        store.get("out/cut.bin").unwrap() == want,
        "the object's bytes differ"
    );
    assert_eq!(r["blake3"], b3(&want), "{r}");
    let sidecar = String::from_utf8(store.get("out/cut.bin.b3").unwrap()).unwrap();
    assert_eq!(sidecar, format!("{}  cut.bin\n", b3(&want)));
    assert_eq!(r["crc64nvme"], store.head("out/cut.bin").1, "{r}");
    assert_eq!(store.uploads(), 0);
}
