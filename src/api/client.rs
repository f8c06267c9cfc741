//! The client side of the API, for `concatd submit --api`: HTTP/1 over a Unix socket (hyper on a
//! `tokio::net::UnixStream`) or over TCP (reqwest).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Where the API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// `unix:/path/api.sock`
    Unix(PathBuf),
    /// `http://host:port` (no trailing slash)
    Http(String),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Http(u) => f.write_str(u),
        }
    }
}

impl std::str::FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/concatd/api.sock".into());
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let u = url::Url::parse(s).map_err(|e| format!("'{s}': {e}"))?;
            if u.path() != "/" || u.query().is_some() {
                return Err(format!(
                    "'{s}': give the address only, e.g. http://127.0.0.1:8707"
                ));
            }
            return Ok(Self::Http(s.trim_end_matches('/').to_owned()));
        }
        Err(format!(
            "'{s}' is not an API address: unix:/path/api.sock or http://host:port"
        ))
    }
}

/// Why a call did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("{addr}: {message}")]
    Exchange { addr: String, message: String },
    #[error("{addr}: no answer within {}", humantime::format_duration(*.after))]
    TimedOut { addr: String, after: Duration },
}

/// One request's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Send one request (`path` with its query) and read the whole answer.
pub async fn call(
    addr: &Addr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Bytes,
    limit: Duration,
) -> Result<Answer, ClientError> {
    let fut = async {
        match addr {
            Addr::Unix(socket) => {
                unix_call(addr, socket, method, path, token, content_type, body).await
            }
            Addr::Http(base) => {
                http_call(addr, base, method, path, token, content_type, body).await
            }
        }
    };
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(ClientError::TimedOut {
            addr: addr.to_string(),
            after: limit,
        })
    })
}

async fn unix_call(
    addr: &Addr,
    socket: &std::path::Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Answer, ClientError> {
    let exchange = |e: &dyn std::fmt::Display| ClientError::Exchange {
        addr: addr.to_string(),
        message: e.to_string(),
    };
    let stream =
        tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                message: e.to_string(),
            })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| exchange(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        req = req.header(hyper::header::CONTENT_TYPE, ct);
    }
    let req = req.body(Full::new(body)).map_err(|e| exchange(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| exchange(&e))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| exchange(&e))?
        .to_bytes();
    Ok(Answer { status, body })
}

async fn http_call(
    addr: &Addr,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Answer, ClientError> {
    let client =
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                message: e.to_string(),
            })?;
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut req = client.request(method, format!("{base}{path}")).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header(reqwest::header::CONTENT_TYPE, ct);
    }
    let resp = req.send().await.map_err(|e| {
        let message = std::error::Error::source(&e)
            .map(|s| format!("{e}: {s}"))
            .unwrap_or_else(|| e.to_string());
        if e.is_connect() {
            ClientError::Connect {
                addr: addr.to_string(),
                message,
            }
        } else {
            ClientError::Exchange {
                addr: addr.to_string(),
                message,
            }
        }
    })?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(|e| ClientError::Exchange {
        addr: addr.to_string(),
        message: e.to_string(),
    })?;
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse::<Addr>(),
            Ok(Addr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "http://127.0.0.1:8707/".parse::<Addr>(),
            Ok(Addr::Http("http://127.0.0.1:8707".into()))
        );
        assert!("127.0.0.1:8707".parse::<Addr>().is_err());
        assert!("unix:".parse::<Addr>().is_err());
        assert!("http://h:1/v1".parse::<Addr>().is_err());
    }
}
