use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Upper bound on a whole [`healthcheck`] call: connect, request and response.
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest response read; enough for a `/readyz` body listing every problem.
const MAX_RESPONSE: u64 = 64 * 1024;

/// Probes `url` (`http://host:port/path`) and succeeds on a 2xx answer.
///
/// This is the binaries' `healthcheck` subcommand, run by container runtimes inside distroless
/// images where there is no curl, so it speaks just enough HTTP/1.1 over a raw socket. Errors
/// name the URL and either the connection problem or the status line and body.
pub async fn healthcheck(url: &str) -> anyhow::Result<()> {
    let target = Target::parse(url)?;
    let (status, reason, body) = tokio::time::timeout(HEALTHCHECK_TIMEOUT, get(&target))
        .await
        .with_context(|| format!("{url} did not answer within {HEALTHCHECK_TIMEOUT:?}"))?
        .with_context(|| format!("GET {url} failed"))?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    let body = body.trim();
    if body.is_empty() {
        bail!("{url} answered {status} {reason}")
    }
    bail!("{url} answered {status} {reason}: {body}")
}

#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `host:port`, for both the socket address and the `Host` header.
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("unsupported health check URL {url:?}: expected http://host:port/path");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            bail!("invalid health check URL {url:?}: expected http://host:port/path");
        }
        let has_port = match authority.rsplit_once(':') {
            // `[::1]` alone has colons but no port.
            Some((host, port)) if !port.contains(']') => {
                if host.is_empty() || port.parse::<u16>().is_err() {
                    bail!("invalid port in health check URL {url:?}");
                }
                true
            }
            _ => false,
        };
        let authority = if has_port { authority.to_owned() } else { format!("{authority}:80") };
        Ok(Self { authority, path: path.to_owned() })
    }
}

async fn get(target: &Target) -> anyhow::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(&target.authority)
        .await
        .with_context(|| format!("cannot connect to {}", target.authority))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cairn-healthcheck\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        target.path, target.authority
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    (&mut stream).take(MAX_RESPONSE).read_to_end(&mut response).await?;
    parse_response(&response)
}

/// Splits a raw response into status code, reason phrase and (best effort, unchunked) body.
fn parse_response(response: &[u8]) -> anyhow::Result<(u16, String, String)> {
    let text = String::from_utf8_lossy(response);
    let Some((status_line, rest)) = text.split_once("\r\n") else {
        bail!("the server closed the connection without a complete HTTP status line");
    };
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("malformed HTTP status line {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("malformed HTTP status line {status_line:?}");
    }
    let status: u16 = code.parse().with_context(|| format!("malformed HTTP status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or("").to_owned();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    let chunked =
        headers.lines().any(|line| line.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { String::new() } else { body.to_owned() };
    Ok((status, reason, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:9090/readyz").unwrap();
        assert_eq!(t.authority, "127.0.0.1:9090");
        assert_eq!(t.path, "/readyz");
        let t = Target::parse("http://localhost").unwrap();
        assert_eq!(t.authority, "localhost:80");
        assert_eq!(t.path, "/");
        let t = Target::parse("http://[::1]:8080/healthz?x=1").unwrap();
        assert_eq!(t.authority, "[::1]:8080");
        assert_eq!(t.path, "/healthz?x=1");
        assert_eq!(Target::parse("http://[::1]").unwrap().authority, "[::1]:80");

        for bad in
            ["https://x:1/", "x:1/healthz", "http://", "http://h:port/", "http://:80/", "http://u@h:1/"]
        {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_responses() {
        let (status, reason, body) =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, reason.as_str(), body.as_str()), (503, "Service Unavailable", "{}"));
        let (status, _, body) =
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!((status, body.as_str()), (200, ""));
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }
}
