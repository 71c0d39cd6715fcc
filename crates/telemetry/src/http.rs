//! Minimal HTTP/1.1 endpoints: a synchronous handler per request, enough for
//! metrics, readiness and admin pages.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

/// Response body of the endpoints.
pub type Body = Full<Bytes>;

/// A response with `status` and a text body.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Serves `handler` on `listener` for ever. A failed accept (for example out
/// of file descriptors) is logged and retried, not fatal.
pub async fn serve<F>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let h = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let h = h.clone();
                async move { Ok::<_, Infallible>(h(req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The admin endpoint's `/logging`: `GET` shows the log directives,
/// `POST /logging?level=<RUST_LOG directives>` changes them at run time.
pub fn logging_endpoint(log: &crate::LogControl, req: &Request<Incoming>) -> Response<Body> {
    match *req.method() {
        http::Method::GET => text(StatusCode::OK, format!("{}\n", log.current())),
        http::Method::POST => {
            let level = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")))
                .map(|v| v.replace("%2C", ",").replace("%3D", "="));
            match level {
                Some(l) => match log.set(&l) {
                    Ok(()) => {
                        tracing::info!(level = %l, "log level changed");
                        text(StatusCode::OK, format!("{l}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                None => text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=<RUST_LOG directives>\n"),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n"),
    }
}

/// Serves `registry` in the Prometheus text format on `/metrics`.
pub async fn serve_metrics(listener: TcpListener, registry: Arc<Registry>) {
    serve(listener, move |req| {
        if req.uri().path() != "/metrics" {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        let mut out = String::new();
        match prometheus_client::encoding::text::encode(&mut out, &registry) {
            Ok(()) => {
                let mut r = text(StatusCode::OK, out);
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("bug: cannot encode metrics: {e}\n")),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn metrics_are_served_on_their_path_and_nothing_else() {
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        reg.register("ambit_test_things", "things", c.clone());
        c.inc_by(3);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_metrics(l, Arc::new(reg)));
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("ambit_test_things_total 3"), "{ok}");
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
    }
}
