//! The misbehaving HTTP server: HTTP/1.1 on 127.0.0.1, one thread per connection, behaviour chosen
//! by the first path segment (`/ok/`, `/drop/`, `/flaky/`, `/change/`, `/lie/`, `/slow/`, …).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Object {
    data: Vec<u8>,
    etag: String,
}

#[derive(Default)]
pub struct Store {
    pub objects: Mutex<HashMap<String, Object>>,
    pub hits: Mutex<HashMap<String, u32>>,
    generation: AtomicU32,
}

pub struct Server {
    pub port: u16,
    pub store: Arc<Store>,
}

impl Server {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let store = Arc::new(Store::default());
        let s = store.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, &s, port);
                });
            }
        });
        Server { port, store }
    }

    pub fn put(&self, name: &str, data: Vec<u8>) {
        let g = self.store.generation.fetch_add(1, Ordering::Relaxed);
        self.store.objects.lock().unwrap().insert(
            name.to_owned(),
            Object {
                data,
                etag: format!("\"{name}-v{g}\""),
            },
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// `bytes=A-B` against a length → (start, end exclusive).
fn range_of(h: &HashMap<String, String>, len: usize) -> Option<(usize, usize)> {
    let spec = h.get("range")?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let a: usize = a.parse().ok()?;
    let b: usize = b.parse::<usize>().ok()?.min(len - 1);
    Some((a, b + 1))
}

fn handle(mut stream: TcpStream, store: &Store, port: u16) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut h = HashMap::new();
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l)? == 0 || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            h.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let hit = {
        let mut hits = store.hits.lock().unwrap();
        let n = hits.entry(format!("{method} {path}")).or_insert(0);
        *n += 1;
        *n
    };
    let mut segs = path.trim_start_matches('/').splitn(2, '/');
    let (kind, name) = (segs.next().unwrap_or(""), segs.next().unwrap_or(""));
    let head = method == "HEAD";
    match kind {
        "always503" => return respond(&mut stream, "503 Service Unavailable", &[], b""),
        // 503 once per method and path, asking for a 1 s pause.
        "flaky" if hit == 1 => {
            let wait = [("Retry-After", "1".to_owned())];
            return respond(&mut stream, "503 Service Unavailable", &wait, b"");
        }
        "forbidden" => return respond(&mut stream, "403 Forbidden", &[], b""),
        "redirect-out" => {
            let to = format!("http://127.0.0.1:{port}/secret/{name}");
            return respond(&mut stream, "302 Found", &[("Location", to)], b"");
        }
        // Credentials and signatures in the Location, for tests that they are never echoed.
        "redirect-creds" => {
            let to = format!(
                "http://user:PWSECRET@127.0.0.1:{port}/ok/{name}?X-Amz-Signature=SIGSECRET"
            );
            return respond(&mut stream, "302 Found", &[("Location", to)], b"");
        }
        "redirect-signed" => {
            let to = format!(
                "http://127.0.0.1:{port}/secret/{name}?X-Amz-Credential=CREDSECRET&sig=SIG2SECRET"
            );
            return respond(&mut stream, "302 Found", &[("Location", to)], b"");
        }
        "redir" => {
            let to = format!("/ok/{name}");
            return respond(&mut stream, "302 Found", &[("Location", to)], b"");
        }
        _ => {}
    }
    let objects = store.objects.lock().unwrap();
    let Some(obj) = objects.get(name) else {
        let _ = respond(
            &mut stream,
            "404 Not Found",
            &[("Content-Length", "0".into())],
            b"",
        );
        return Ok(());
    };
    let len = obj.data.len();
    if head && kind.ends_with("nohead") {
        let _ = respond(&mut stream, "405 Method Not Allowed", &[], b"");
        return Ok(());
    }
    if head {
        let mut hs = vec![
            ("ETag", obj.etag.clone()),
            ("Accept-Ranges", "bytes".into()),
        ];
        if kind != "nolen" {
            hs.push(("Content-Length", len.to_string()));
        }
        let _ = respond(&mut stream, "200 OK", &hs, b"");
        return Ok(());
    }
    // `changequiet` ignores If-Match, like some servers do: the client must compare ETags itself.
    if let Some(want) = h.get("if-match")
        && want != &obj.etag
        && kind != "changequiet"
    {
        let _ = respond(
            &mut stream,
            "412 Precondition Failed",
            &[("Content-Length", "0".into())],
            b"",
        );
        return Ok(());
    }
    // `norange…` servers ignore Range, like python's http.server: 200 and every byte.
    let ranged = !kind.starts_with("norange");
    let (a, b) = range_of(&h, len).filter(|_| ranged).unwrap_or((0, len));
    let body = obj.data[a..b].to_vec();
    let etag = obj.etag.clone();
    drop(objects);
    let mut hs = vec![
        ("ETag", etag),
        ("Content-Range", format!("bytes {a}-{}/{len}", b - 1)),
    ];
    if !ranged {
        hs.retain(|(k, _)| *k != "Content-Range");
        hs.push(("Content-Length", body.len().to_string()));
        // `norangedrop`: the first GET sends half the object, then the connection drops.
        let cut = if kind == "norangedrop" && hit == 1 {
            body.len() / 2
        } else {
            body.len()
        };
        let _ = respond(&mut stream, "200 OK", &hs, &body[..cut]);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    match kind {
        // The first GET sends half its body, then the connection drops.
        "drop" if hit == 1 => {
            hs.push(("Content-Length", body.len().to_string()));
            let _ = respond(
                &mut stream,
                "206 Partial Content",
                &hs,
                &body[..body.len() / 2],
            );
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // The object is replaced after the first range was served.
        "change" | "changequiet" => {
            hs.push(("Content-Length", body.len().to_string()));
            let _ = respond(&mut stream, "206 Partial Content", &hs, &body);
            let mut objects = store.objects.lock().unwrap();
            if let Some(o) = objects.get_mut(name) {
                o.etag = format!("\"{name}-replaced\"");
                o.data.iter_mut().for_each(|b| *b = !*b);
            }
        }
        // Promises a shorter body than the range it claims to send.
        "lie" => {
            hs.push(("Content-Length", (body.len() / 2).to_string()));
            let _ = respond(
                &mut stream,
                "206 Partial Content",
                &hs,
                &body[..body.len() / 2],
            );
        }
        // Some bytes, then silence far longer than the idle timeout.
        "slow" => {
            hs.push(("Content-Length", body.len().to_string()));
            let _ = respond(&mut stream, "206 Partial Content", &hs, &body[..1024]);
            std::thread::sleep(Duration::from_secs(3));
        }
        // A byte every 10 ms: never idle long enough to time out, never done.
        "trickle" => {
            hs.push(("Content-Length", body.len().to_string()));
            let _ = respond(&mut stream, "206 Partial Content", &hs, &[]);
            for byte in &body {
                if stream.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        _ => {
            hs.push(("Content-Length", body.len().to_string()));
            let _ = respond(&mut stream, "206 Partial Content", &hs, &body);
        }
    }
    Ok(())
}
