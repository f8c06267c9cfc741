//! SSRF guards, inside a network namespace.

use super::*;

/// Guard: every case here runs `concatd` under `unshare --net --mount`, in a new network namespace
/// where only `lo` exists (brought up by the script), so an address that should be refused but is
/// not can only fail to connect (`remote_failed`), never reach another machine. A private mount
/// namespace bind-mounts a test hosts file over /etc/hosts to make names resolve to internal
/// addresses. `source_not_allowed` therefore proves the guard refused, not the network.
#[test]
fn ssrf_cases_in_a_network_namespace() {
    let probe = Command::new("unshare")
        .args(["--net", "--mount", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        return skip_outside_ci("`unshare --net --mount` is unavailable here (needs root)");
    }
    let port = 18080;
    let urls = [
        format!("http://127.0.0.1:{port}/"),
        "http://internal.test/".to_owned(),
        "http://meta.test/".to_owned(),
        format!("http://loop.test:{port}/"),
    ];
    let job = Job::new(&urls, "");
    std::fs::write(
        job.path("hosts"),
        "127.0.0.1 localhost\n10.0.0.1 internal.test\n169.254.169.254 meta.test\n127.0.0.1 loop.test\n",
    )
    .unwrap();
    std::fs::write(job.path("served.bin"), data(3000, 10)).unwrap();
    // A server inside the namespace: serves files, and redirects /to-* elsewhere.
    let server = r#"
import http.server, os, sys
targets = {"/to-meta": "http://169.254.169.254/latest/meta-data/",
           "/to-internal": "http://internal.test/x.bin",
           "/to-private-ip": "http://10.0.0.1/x.bin"}
class H(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        if self.path in targets:
            self.send_response(302)
            self.send_header("Location", targets[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return super().send_head()
    def log_message(self, *a): pass
os.chdir(sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    std::fs::write(job.path("server.py"), server).unwrap();
    let cases: [(&str, &str); 8] = [
        // control: proves the namespace harness can succeed
        ("served.bin", "succeeded"),
        // an IP literal that no allow entry names
        (
            "http://169.254.169.254/latest/meta-data/",
            "source_not_allowed",
        ),
        ("http://10.0.0.1/x.bin", "source_not_allowed"),
        // allowed names that resolve to internal addresses (checked at connect time)
        ("http://internal.test/x.bin", "source_not_allowed"),
        ("http://meta.test/latest/meta-data/", "source_not_allowed"),
        ("loop", "source_not_allowed"),
        // redirects to internal addresses
        ("to-meta", "source_not_allowed"),
        ("to-internal", "source_not_allowed"),
    ];
    let bin = assert_cmd::cargo::cargo_bin!("concatd");
    let mut script = format!(
        "set -e\nip link set lo up\nmount --bind {hosts} /etc/hosts\npython3 {server} {port} {root} >/dev/null 2>&1 &\nserver=$!\nfor i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:{port}/ && break; sleep 0.05; done\nset +e\n",
        hosts = job.path("hosts").display(),
        server = job.path("server.py").display(),
        root = job.dir.path().display(),
    );
    for (i, (src, _)) in cases.iter().enumerate() {
        let url = match *src {
            "served.bin" | "to-meta" | "to-internal" => format!("http://127.0.0.1:{port}/{src}"),
            "loop" => format!("http://loop.test:{port}/served.bin"),
            other => other.to_owned(),
        };
        let m = job.path(&format!("in/m{i}.json"));
        let manifest =
            serde_json::json!({"output": format!("out{i}.bin"), "sources": [url]}).to_string();
        std::fs::write(&m, manifest).unwrap();
        script.push_str(&format!(
            "{bin} once -c {rules} --rule r {m} > {res} 2>/dev/null\n",
            bin = bin.display(),
            rules = job.path("rules.yaml").display(),
            m = m.display(),
            res = job.path(&format!("res{i}.json")).display(),
        ));
    }
    script.push_str("kill $server\n");
    let out = Command::new("unshare")
        .args(["--net", "--mount", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    for (i, (src, want)) in cases.iter().enumerate() {
        let text = std::fs::read(job.path(&format!("res{i}.json"))).unwrap_or_default();
        let r = parse_result(&text, &out.stderr);
        println!("{src}: {} {}", r["status"], r["error"]["message"]);
        assert_eq!(
            r["status"] == "succeeded",
            *want == "succeeded",
            "{src}: {r}"
        );
        if *want != "succeeded" {
            assert_eq!(r["error"]["kind"], *want, "{src}: {r}");
            assert!(!job.path(&format!("out/out{i}.bin")).exists());
        }
    }
    assert_eq!(
        std::fs::read(job.path("out/out0.bin")).unwrap(),
        data(3000, 10)
    );
}
