//! One HTTP/1.1 GET of a daemon's operator endpoint (`/metrics`, `/readyz`), bounded: a
//! deadline over the whole exchange (connect, answer, body) and a cap on the body's size.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Why a GET gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an http://HOST:PORT/PATH URL: {1}")]
    BadUrl(String, String),
    #[error("{url}: no answer within {deadline:?}")]
    Timeout { url: String, deadline: Duration },
    #[error("{url}: connecting: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{url}: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("{url}: the body is over {cap} bytes")]
    TooLarge { url: String, cap: usize },
    #[error("{url}: answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the body is not UTF-8")]
    NotText { url: String },
}

/// An `http://` URL, split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// As given, for messages.
    pub text: String,
    /// `host:port`.
    pub authority: String,
    /// Path and query, `/` at least.
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Self, FetchError> {
        let bad = |why: &str| FetchError::BadUrl(text.to_owned(), why.to_owned());
        let uri: hyper::Uri = text
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is served (the daemons' --http-listen)"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            text: text.to_owned(),
            authority: format!("{}:{port}", authority.host()),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    /// Another path on the same server.
    pub fn with_path(&self, path: &str) -> Self {
        Self {
            text: format!("http://{}{path}", self.authority),
            authority: self.authority.clone(),
            path: path.to_owned(),
        }
    }
}

/// The answer to a GET: its status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// GETs `url`, within `deadline`, reading at most `cap` bytes of body.
pub async fn get(url: &Url, deadline: Duration, cap: usize) -> Result<Answer, FetchError> {
    tokio::time::timeout(deadline, get_unbounded_in_time(url, cap))
        .await
        .map_err(|_| FetchError::Timeout {
            url: url.text.clone(),
            deadline,
        })?
}

/// GETs `url` and demands a 200 with a UTF-8 body.
pub async fn get_text(url: &Url, deadline: Duration, cap: usize) -> Result<String, FetchError> {
    let answer = get(url, deadline, cap).await?;
    if answer.status != 200 {
        return Err(FetchError::Status {
            url: url.text.clone(),
            status: answer.status,
        });
    }
    Ok(answer.body)
}

async fn get_unbounded_in_time(url: &Url, cap: usize) -> Result<Answer, FetchError> {
    let http = |source| FetchError::Http {
        url: url.text.clone(),
        source,
    };
    let stream = tokio::net::TcpStream::connect(&url.authority)
        .await
        .map_err(|source| FetchError::Connect {
            url: url.text.clone(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // Drives the connection while the request runs; dropped (and the socket closed) with it.
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::BadUrl(url.text.clone(), e.to_string()))?;
    let result = async {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), cap)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => http(*e),
                Err(_) => FetchError::TooLarge {
                    url: url.text.clone(),
                    cap,
                },
            })?
            .to_bytes();
        let body = String::from_utf8(body.to_vec()).map_err(|_| FetchError::NotText {
            url: url.text.clone(),
        })?;
        Ok(Answer { status, body })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_with_a_host() {
        let u = Url::parse("http://127.0.0.1:9465/metrics").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("127.0.0.1:9465", "/metrics")
        );
        assert_eq!(
            Url::parse("http://localhost").unwrap().authority,
            "localhost:80"
        );
        assert_eq!(u.with_path("/readyz").text, "http://127.0.0.1:9465/readyz");
        for bad in [
            "https://x:1/metrics",
            "127.0.0.1:9465",
            "http:///metrics",
            "x y",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    async fn serve_once(answer: Vec<u8>, delay: Duration) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(delay).await;
            let _ = s.write_all(&answer).await;
            let _ = s.shutdown().await;
        });
        Url::parse(&format!("http://{addr}/metrics")).unwrap()
    }

    #[tokio::test]
    async fn an_answer_is_bounded_in_size_and_time() {
        let ok = serve_once(
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nx 1\n".to_vec(),
            Duration::ZERO,
        )
        .await;
        assert_eq!(
            get_text(&ok, Duration::from_secs(5), 64).await.unwrap(),
            "x 1\n"
        );

        let big = serve_once(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}",
                "y".repeat(100)
            )
            .into_bytes(),
            Duration::ZERO,
        )
        .await;
        let e = get_text(&big, Duration::from_secs(5), 64)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::TooLarge { cap: 64, .. }), "{e}");

        let slow = serve_once(b"HTTP/1.1 200 OK\r\n\r\n".to_vec(), Duration::from_secs(10)).await;
        let e = get_text(&slow, Duration::from_millis(200), 64)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Timeout { .. }), "{e}");

        let not_ready = || {
            serve_once(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\nnot ready\n"
                    .to_vec(),
                Duration::ZERO,
            )
        };
        let answer = get(&not_ready().await, Duration::from_secs(5), 64)
            .await
            .unwrap();
        assert_eq!((answer.status, answer.body.as_str()), (503, "not ready\n"));
        let e = get_text(&not_ready().await, Duration::from_secs(5), 64)
            .await
            .unwrap_err();
        assert!(e.to_string().ends_with("answered 503"), "{e}");

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/metrics", closed.local_addr().unwrap())).unwrap();
        drop(closed);
        let e = get_text(&url, Duration::from_secs(5), 64)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Connect { .. }), "{e}");
    }
}
