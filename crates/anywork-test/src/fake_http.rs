//! What the fakes of third-party APIs ([`fake_github`](crate::fake_github),
//! [`fake_slack`](crate::fake_slack)) share: the recorded request, injected faults, and a
//! loopback server.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use serde_json::Value;
use tokio::task::JoinHandle;

/// One request a fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path with the query string.
    pub path: String,
    /// Headers by lowercased name; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON; [`Value::Null`] when empty or not JSON.
    pub body: Value,
    /// The body as text (lossy UTF-8).
    pub raw_body: String,
}

impl Recorded {
    /// Builds the record of a request.
    pub fn new(method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Self {
        let mut map = BTreeMap::<String, String>::new();
        for (k, v) in headers {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            map.entry(k.as_str().to_owned())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(&v);
                })
                .or_insert(v);
        }
        Self {
            method: method.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| uri.path().to_owned()),
            headers: map,
            body: serde_json::from_slice(body).unwrap_or(Value::Null),
            raw_body: String::from_utf8_lossy(body).into_owned(),
        }
    }

    /// The path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }

    /// A query parameter's value (percent-decoding `%XX` and `+`).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.path.split_once('?')?.1;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    /// A header's value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// `METHOD /path` (no query), for compact assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path_only())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A failure to answer with instead of the normal behaviour, for the next `times` requests
/// whose method matches (when set) and whose path contains `path_contains`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Only requests with this method (`POST`), or any.
    pub method: Option<String>,
    /// Only requests whose path (with query) contains this.
    pub path_contains: String,
    /// The status to answer.
    pub status: u16,
    /// Extra headers (e.g. `Retry-After`).
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: Value,
    /// How many requests it hits.
    pub times: usize,
}

impl Fault {
    /// `status` with an empty JSON object, once, for requests whose path contains `path`.
    pub fn status(path: impl Into<String>, status: u16) -> Self {
        Self {
            method: None,
            path_contains: path.into(),
            status,
            headers: Vec::new(),
            body: Value::Object(Default::default()),
            times: 1,
        }
    }

    /// Only for `method`.
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: Value) -> Self {
        self.body = body;
        self
    }

    /// Hits `n` requests.
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }
}

/// Takes the first fault matching `req` (counting it down).
pub fn take_fault(faults: &mut Vec<Fault>, req: &Recorded) -> Option<Fault> {
    let i = faults.iter().position(|f| {
        f.times > 0
            && f.method.as_deref().is_none_or(|m| m == req.method)
            && req.path.contains(&f.path_contains)
    })?;
    faults[i].times -= 1;
    let fault = faults[i].clone();
    if faults[i].times == 0 {
        faults.remove(i);
    }
    Some(fault)
}

/// Serves `app` on `127.0.0.1:0`; the task stops when the handle is aborted.
pub async fn serve(app: Router) -> (SocketAddr, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port for a fake API");
    let addr = listener.local_addr().expect("local address");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, server)
}

/// The current time in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let r = Recorded {
            method: "GET".into(),
            path: "/x?a=1&since=2024-01-01T00%3A00%3A00Z&q=a+b&bad=%zz&end=%4".into(),
            headers: BTreeMap::new(),
            body: Value::Null,
            raw_body: String::new(),
        };
        assert_eq!(r.query_param("a").as_deref(), Some("1"));
        assert_eq!(
            r.query_param("since").as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        assert_eq!(r.query_param("q").as_deref(), Some("a b"));
        assert_eq!(r.query_param("bad").as_deref(), Some("%zz"));
        assert_eq!(r.query_param("end").as_deref(), Some("%4"));
        assert_eq!(r.query_param("none"), None);
    }

    #[test]
    fn faults_count_down() {
        let mut faults = vec![Fault::status("/a", 500).times(2)];
        let r = Recorded {
            method: "POST".into(),
            path: "/a/b".into(),
            headers: BTreeMap::new(),
            body: Value::Null,
            raw_body: String::new(),
        };
        assert!(take_fault(&mut faults, &r).is_some());
        assert!(take_fault(&mut faults, &r).is_some());
        assert!(take_fault(&mut faults, &r).is_none());
    }
}
