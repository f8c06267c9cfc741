//! S3 (moto) and a mixed manifest.

use super::*;

pub(crate) struct Moto {
    child: std::process::Child,
    pub(crate) endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_moto() -> Option<Moto> {
    start_moto_logging(Stdio::null())
}

/// moto with its stderr, one line per request, sent to `log`.
pub(crate) fn start_moto_logging(log: Stdio) -> Option<Moto> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .ok()?;
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}

pub(crate) const AWS_ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
];

#[test]
fn s3_objects_via_moto_and_a_mixed_manifest() {
    let Some(moto) = start_moto() else {
        return skip_outside_ci(
            "moto_server is not installed (pip install 'moto[server]'; .ci/run does)",
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let (plain, local, web) = (data(700_000, 11), data(12_345, 12), data(99_999, 13));
    std::fs::write(dir.path().join("plain.bin"), &plain).unwrap();
    // Bucket and objects through the S3 API (boto3, which moto brings along).
    let fill = format!(
        r#"
import boto3
s3 = boto3.client("s3", endpoint_url="{ep}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
s3.create_bucket(Bucket="bkt")
s3.put_object(Bucket="bkt", Key="data/plain.bin", Body=open("{dir}/plain.bin", "rb").read())
s3.put_object(Bucket="bkt", Key="data/cold.bin", Body=b"frozen", StorageClass="GLACIER")
s3.put_object(Bucket="bkt", Key="data/deep.bin", Body=b"frozen", StorageClass="DEEP_ARCHIVE")
s3.put_object(Bucket="bkt", Key="secret/x.bin", Body=b"no")
"#,
        ep = moto.endpoint,
        dir = dir.path().display()
    );
    let st = Command::new("python3")
        .arg("-c")
        .arg(&fill)
        .status()
        .unwrap();
    assert!(st.success(), "could not fill moto");

    let server = Server::start();
    server.put("web.bin", web.clone());
    let s3 = format!(
        "    s3:\n      endpoint: {}\n      region: us-east-1\n      path_style: true\n",
        moto.endpoint
    );
    let job = Job::new(&["s3://bkt/data/".to_owned(), server.url("ok/")], &s3);
    std::fs::write(job.path("src/local.bin"), &local).unwrap();
    let run = |sources: Value| {
        let m = job.manifest(sources);
        let mut c = job.command(&m);
        c.envs(AWS_ENV);
        let out = c.output().unwrap();
        parse_result(&out.stdout, &out.stderr)
    };
    let fails = |sources: Value, kind: &str| {
        let r = run(sources);
        assert_eq!(r["error"]["kind"], kind, "{r}");
        assert!(!job.path("out/merged.bin").exists());
    };

    // Mixed: local + http + s3 (whole, and a range), byte- and BLAKE3-equal.
    let r = run(serde_json::json!([
        "local.bin",
        server.url("ok/web.bin"),
        "s3://bkt/data/plain.bin",
        {"url": "s3://bkt/data/plain.bin", "offset": 1000, "length": 70_000},
    ]));
    assert_eq!(r["status"], "succeeded", "{r}");
    let mut want = local.clone();
    want.extend_from_slice(&web);
    want.extend_from_slice(&plain);
    want.extend_from_slice(&plain[1000..71_000]);
    let got = job.output();
    assert!(got == want, "output differs");
    assert_eq!(r["blake3"], b3(&want));
    let b3sum = Command::new("b3sum")
        .arg("--no-names")
        .arg(job.path("out/merged.bin"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&b3sum.stdout).trim(), b3(&want));
    std::fs::remove_file(job.path("out/merged.bin")).unwrap();
    std::fs::remove_file(job.path("out/merged.bin.b3")).unwrap();

    fails(
        serde_json::json!(["s3://bkt/data/missing.bin"]),
        "source_not_found",
    );
    fails(
        serde_json::json!(["s3://bkt/data/cold.bin"]),
        "source_archived",
    );
    fails(
        serde_json::json!(["s3://bkt/data/deep.bin"]),
        "source_archived",
    );
    fails(
        serde_json::json!(["s3://bkt/secret/x.bin"]),
        "source_not_allowed",
    );
    fails(
        serde_json::json!([{"url": "s3://bkt/data/plain.bin", "offset": 699_999, "length": 2}]),
        "size_mismatch",
    );
}
