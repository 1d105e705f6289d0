//! The Kubernetes client of `hotplug-agent run`.
//!
//! - [`build`]: from a kubeconfig file (or inferred: in-cluster, `$KUBECONFIG`,
//!   `~/.kube/config`). A kubeconfig that carries its own CA (`certificate-authority-data`,
//!   `certificate-authority`) or names a plain `http://` server never needs the host's
//!   trust store; only an `https://` server without a CA in the kubeconfig does, and where
//!   the host has none (a minimal Debian without `ca-certificates`) the error says exactly
//!   that ([`ClientError::NoTrustStore`]).
//! - [`lazy`]: where the client cannot be built (no kubeconfig yet, an unparsable one, no
//!   trust store), a client that tries again on every request. The agent keeps running
//!   report-only meanwhile: each request fails with the build error, which the controller
//!   reports once as `api_unreachable` and retries with back-off, so a kubeconfig that
//!   appears or is fixed later is picked up without a restart, and systemd never sees a
//!   crash loop.
use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper::{Request, Response};
use kube::{
    Client, Config,
    client::Body,
    config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError},
};

/// A kubeconfig is a few KiB; anything this large is not one (and is not read whole).
pub const MAX_KUBECONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the kubeconfig {} cannot be read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the kubeconfig {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("the kubeconfig {} has {size} bytes, more than a kubeconfig ({MAX_KUBECONFIG_BYTES})", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("the kubeconfig {} is not usable", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error(
        "no kubeconfig given and none found (in-cluster service account, $KUBECONFIG, ~/.kube/config)"
    )]
    Infer(#[source] InferConfigError),
    #[error(
        "the API server {server} is https:// and the kubeconfig has no certificate-authority-data \
         or certificate-authority, so the host's trust store would be needed, and it has no CA \
         certificates: put the cluster's CA in the kubeconfig (or install ca-certificates)"
    )]
    NoTrustStore {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the API server {server} is not an http:// or https:// URL: no retry can reach it; \
         fix the kubeconfig's `server`"
    )]
    Scheme { server: String },
    #[error("building the Kubernetes client for {server}")]
    Build {
        server: String,
        #[source]
        source: kube::Error,
    },
}

/// Builds the client from `kubeconfig`, or from the inferred configuration.
pub async fn build(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = read_kubeconfig(path).await?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(ClientError::Infer)?,
    };
    from_config(config)
}

/// Reads a kubeconfig file, refusing what cannot be one (a FIFO would block the read
/// forever, `/dev/zero` would never end). Off the runtime thread: it is file I/O.
async fn read_kubeconfig(path: &Path) -> Result<Kubeconfig, ClientError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read_kubeconfig_blocking(&owned))
        .await
        .map_err(|e| ClientError::Read {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?
}

fn read_kubeconfig_blocking(path: &Path) -> Result<Kubeconfig, ClientError> {
    let meta = std::fs::metadata(path).map_err(|source| ClientError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ClientError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.len() > MAX_KUBECONFIG_BYTES {
        return Err(ClientError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    // Kubeconfig::read_from also makes the files the kubeconfig names absolute, relative
    // to its directory, as kubectl does.
    Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
        path: path.to_owned(),
        source,
    })
}

impl ClientError {
    /// An error that no retry and no file appearing later can fix: the agent refuses to
    /// start rather than retry forever.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Scheme { .. })
    }
}

/// The agent's `User-Agent` on every API request, as kubectl sends `kubectl/v1.x`: the API
/// server's audit log and API Priority and Fairness see which component called, and the
/// tests tell the agent's requests from the kubelet stand-in's by it (the RBAC check).
pub const USER_AGENT: &str = concat!("hotplug-agent/", env!("CARGO_PKG_VERSION"));

/// Builds the client for a loaded configuration.
pub fn from_config(mut config: Config) -> Result<Client, ClientError> {
    config.headers.push((
        hyper::header::USER_AGENT,
        hyper::header::HeaderValue::from_static(USER_AGENT),
    ));
    let server = config.cluster_url.to_string();
    // kube would build a client for `ftp://` too, whose every request then fails as an
    // unreachable API, retried for ever.
    if !matches!(config.cluster_url.scheme_str(), Some("http" | "https")) {
        return Err(ClientError::Scheme { server });
    }
    let plain_http = config.cluster_url.scheme_str() == Some("http");
    let tls_proxy = config
        .proxy_url
        .as_ref()
        .is_some_and(|p| p.scheme_str() == Some("https"));
    if plain_http && !tls_proxy && config.root_cert.is_none() {
        // kube builds its rustls configuration even for an http:// server (one connector
        // does both, by URL scheme), and without a CA it asks the platform verifier, which
        // fails on a host without a CA bundle. An empty set of roots is never used for
        // http://, and would trust nothing if it were.
        config.root_cert = Some(Vec::new());
    }
    let needs_trust_store = config.cluster_url.scheme_str() == Some("https")
        && config.root_cert.is_none()
        && config.root_cert_file.is_none()
        && !config.accept_invalid_certs;
    Client::try_from(config).map_err(|source| match source {
        kube::Error::RustlsTls(_) if needs_trust_store => {
            ClientError::NoTrustStore { server, source }
        }
        source => ClientError::Build { server, source },
    })
}

/// A client that builds the real one on first use and on every use until that works.
///
/// `kubeconfig` is read again each time, so a file that appears or is fixed later is
/// picked up. Requests made before that fail with the [`ClientError`] of the last try.
pub fn lazy(kubeconfig: Option<PathBuf>) -> Client {
    let service = Lazy {
        kubeconfig: kubeconfig.map(Arc::from),
        client: Arc::new(tokio::sync::Mutex::new(None)),
    };
    let namespace = namespace_now(service.kubeconfig.as_deref());
    Client::new(service, &namespace)
}

/// The in-cluster service account's namespace file.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The default namespace the real client will have, as far as it can be told before it
/// can be built, in kube's own order (`Config::infer`): the kubeconfig's current context,
/// else the in-cluster service account's, else `default`. The fleet's Leases go there
/// unless `--lease-namespace` says otherwise; a kubeconfig that cannot be read at all
/// yet leaves `default`.
fn namespace_now(kubeconfig: Option<&Path>) -> String {
    let kubeconfig = match kubeconfig {
        // Read with the same guards as for the client: a FIFO or /dev/zero is not read.
        Some(path) => read_kubeconfig_blocking(path).ok(),
        None => Kubeconfig::read().ok(),
    };
    let from_context = kubeconfig.and_then(|kc| {
        let current = kc.current_context.clone()?;
        kc.contexts
            .into_iter()
            .find(|c| c.name == current)?
            .context?
            .namespace
    });
    from_context
        .or_else(|| {
            let text = std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok()?;
            Some(text.trim().to_owned()).filter(|ns| !ns.is_empty())
        })
        .unwrap_or_else(|| "default".to_owned())
}

#[derive(Clone)]
struct Lazy {
    kubeconfig: Option<Arc<Path>>,
    client: Arc<tokio::sync::Mutex<Option<Client>>>,
}

impl Lazy {
    async fn client(&self) -> Result<Client, ClientError> {
        // Held while building: concurrent requests wait for one try instead of racing.
        let mut slot = self.client.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let client = build(self.kubeconfig.as_deref()).await?;
        tracing::info!("the Kubernetes client could be built now; leaving report-only mode");
        *slot = Some(client.clone());
        Ok(client)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<Request<Body>> for Lazy {
    type Response = Response<Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<Result<Response<Body>, tower::BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Always ready: kube's Buffer would end the client for good on a poll_ready error.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let client = this.client().await?;
            Ok(client.send(request).await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, process::Command};

    use k8s_openapi::api::core::v1::Node;
    use kube::Api;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::sources::error_chain;

    /// A self-signed CA (CN=hotplug-agent-test-ca, made with openssl for these tests).
    const TEST_CA_PEM: &str = include_str!("../tests/fixtures/test-ca.pem");

    /// Set in the child process that runs a test with an empty trust store.
    const CHILD: &str = "HOTPLUG_AGENT_TEST_EMPTY_TRUST_STORE";

    /// Runs the test `name` again in a child process whose trust store is empty:
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR` (which rustls-native-certs reads instead of the
    /// system's paths when set) name files that do not exist, as on a host without
    /// ca-certificates. Environment variables cannot be changed safely in the test harness's
    /// own threads, hence the child. Returns true in the child, where the test body runs.
    fn in_empty_trust_store(name: &str) -> bool {
        if std::env::var_os(CHILD).is_some() {
            return true;
        }
        let exe = std::env::current_exe().expect("test binary path");
        let out = Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("SSL_CERT_FILE", "/nonexistent/hotplug-agent-test/ca.pem")
            .env("SSL_CERT_DIR", "/nonexistent/hotplug-agent-test/certs")
            .output()
            .expect("running the test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{name} in an empty trust store:\n{stdout}\n{stderr}"
        );
        false
    }

    /// The error of a build that must fail (`Client` has no Debug for `unwrap_err`).
    fn refused(result: Result<Client, ClientError>) -> ClientError {
        match result {
            Ok(_) => panic!("a client was built"),
            Err(e) => e,
        }
    }

    fn kubeconfig(dir: &Path, server: &str, cluster_extra: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        let mut f = std::fs::File::create(&path).unwrap();
        write!(
            f,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters:\n- name: k\n  cluster:\n    server: {server}\n{cluster_extra}\
             contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n\
             users:\n- name: u\n  user:\n    token: t0ken\n"
        )
        .unwrap();
        path
    }

    fn b64(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Answers every request with this Node, as the API server would for
    /// `GET /api/v1/nodes/{name}` (status and headers as kube-apiserver sends them), and
    /// counts the requests and the bearer tokens it saw.
    async fn api_server(node: &'static str) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                log.lock().unwrap().push(head);
                let body = format!(
                    r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}","uid":"u-1"}}}}"#
                );
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_says_which_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let e = refused(build(Some(&path)).await);
        assert!(matches!(e, ClientError::Read { .. }), "{e:?}");
        let msg = error_chain(&e);
        assert_eq!(
            msg,
            format!(
                "the kubeconfig {} cannot be read: No such file or directory (os error 2)",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn an_unparsable_kubeconfig_says_which_file_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, "clusters: [this is: not: yaml\n").unwrap();
        let e = refused(build(Some(&path)).await);
        assert!(matches!(e, ClientError::Kubeconfig { .. }), "{e:?}");
        let msg = error_chain(&e);
        assert!(
            msg.starts_with(&format!(
                "the kubeconfig {} is not usable: ",
                path.display()
            )) && msg.contains("parse"),
            "{msg}"
        );
        // No server in it: said as such.
        std::fs::write(&path, "apiVersion: v1\nkind: Config\n").unwrap();
        let msg = error_chain(&refused(build(Some(&path)).await));
        assert!(msg.contains("current context"), "{msg}");
    }

    #[tokio::test]
    async fn what_cannot_be_a_kubeconfig_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO would block a read forever; a directory is not a file either.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for path in [fifo, dir.path().to_owned()] {
            let e = refused(build(Some(&path)).await);
            assert!(matches!(e, ClientError::NotAFile { .. }), "{e:?}");
        }
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_KUBECONFIG_BYTES + 1)
            .unwrap();
        let e = refused(build(Some(&big)).await);
        assert!(matches!(e, ClientError::TooLarge { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_server_that_is_not_http_is_refused_for_good() {
        let dir = tempfile::tempdir().unwrap();
        for server in [
            "ftp://127.0.0.1/",
            "gopher://127.0.0.1:70",
            "ws://127.0.0.1:6443",
        ] {
            let path = kubeconfig(dir.path(), server, "");
            let err = refused(build(Some(&path)).await);
            assert!(
                matches!(&err, ClientError::Scheme { server: s } if s.starts_with(&server[..4])),
                "{server}: {err:?}"
            );
            assert!(err.is_permanent());
            assert!(
                err.to_string().contains("not an http:// or https:// URL"),
                "{err}"
            );
        }
        // What a retry may fix is not permanent.
        let err = refused(build(Some(&dir.path().join("absent"))).await);
        assert!(!err.is_permanent(), "{err:?}");
    }

    #[tokio::test]
    async fn plain_http_needs_no_trust_store() {
        if !in_empty_trust_store("kube_client::tests::plain_http_needs_no_trust_store") {
            return;
        }
        let (url, seen) = api_server("node-a").await;
        let dir = tempfile::tempdir().unwrap();
        let path = kubeconfig(dir.path(), &url, "");
        let client = build(Some(&path))
            .await
            .expect("an http:// kubeconfig builds");
        let node = Api::<Node>::all(client).get("node-a").await.unwrap();
        assert_eq!(node.metadata.uid.as_deref(), Some("u-1"));
        let seen = seen.lock().unwrap();
        assert!(seen[0].starts_with("GET /api/v1/nodes/node-a "), "{seen:?}");
        assert!(
            seen[0]
                .to_ascii_lowercase()
                .contains("authorization: bearer t0ken"),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_kubeconfig_with_its_own_ca_needs_no_trust_store() {
        if !in_empty_trust_store(
            "kube_client::tests::a_kubeconfig_with_its_own_ca_needs_no_trust_store",
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let inline = format!(
            "    certificate-authority-data: {}\n",
            b64(TEST_CA_PEM.as_bytes())
        );
        let path = kubeconfig(dir.path(), "https://127.0.0.1:6443", &inline);
        build(Some(&path))
            .await
            .expect("certificate-authority-data is enough");
        // The same CA as a file next to the kubeconfig, named relative to it.
        std::fs::write(dir.path().join("ca.crt"), TEST_CA_PEM).unwrap();
        let path = kubeconfig(
            dir.path(),
            "https://127.0.0.1:6443",
            "    certificate-authority: ca.crt\n",
        );
        build(Some(&path))
            .await
            .expect("certificate-authority is enough");
        // Control: without a CA in the kubeconfig, this process has no trust store at all,
        // so the two builds above did not lean on one.
        let path = kubeconfig(dir.path(), "https://127.0.0.1:6443", "");
        let e = refused(build(Some(&path)).await);
        assert!(matches!(e, ClientError::NoTrustStore { .. }), "{e:?}");
        let msg = error_chain(&e);
        assert!(
            msg.starts_with(
                "the API server https://127.0.0.1:6443/ is https:// and the kubeconfig has no \
                 certificate-authority-data or certificate-authority"
            ) && msg.contains("No CA certificates were loaded from the system"),
            "{msg}"
        );
    }

    /// A client that cannot be built yet (here: an https:// server without a CA, on a host
    /// that may have no trust store) still has the kubeconfig context's namespace, where
    /// the fleet's Leases and the Role for them are; not a hard-coded `default`.
    #[tokio::test]
    async fn a_lazy_client_has_the_kubeconfig_contexts_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = kubeconfig(dir.path(), "https://127.0.0.1:6443", "");
        let text = std::fs::read_to_string(&path).unwrap();
        let with_ns = text.replace("    user: u\n", "    user: u\n    namespace: hotplug\n");
        assert_ne!(text, with_ns);
        std::fs::write(&path, with_ns).unwrap();
        assert_eq!(lazy(Some(path)).default_namespace(), "hotplug");
        // Nothing readable yet: kube's own fallback (the service account's, else default).
        let missing = lazy(Some(dir.path().join("absent")));
        let expected = std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
            .map_or_else(|_| "default".to_owned(), |ns| ns.trim().to_owned());
        assert_eq!(missing.default_namespace(), expected);
    }

    #[tokio::test]
    async fn a_lazy_client_fails_with_the_reason_until_the_kubeconfig_appears() {
        let (url, seen) = api_server("node-b").await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        let nodes = Api::<Node>::all(lazy(Some(path.clone())));
        for _ in 0..2 {
            let e = nodes.get("node-b").await.unwrap_err();
            let msg = error_chain(&e);
            assert!(
                msg.contains(&format!("the kubeconfig {} cannot be read", path.display()))
                    && msg.contains("No such file or directory"),
                "{msg}"
            );
        }
        assert!(seen.lock().unwrap().is_empty(), "nothing was sent yet");
        // An unparsable file: a different reason, still no crash.
        std::fs::write(&path, "{{{").unwrap();
        let msg = error_chain(&nodes.get("node-b").await.unwrap_err());
        assert!(msg.contains("is not usable"), "{msg}");
        // The file appears: the next request goes through, and the client is kept.
        let written = kubeconfig(dir.path(), &url, "");
        assert_eq!(written, path);
        let node = nodes.get("node-b").await.unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("node-b"));
        std::fs::remove_file(&path).unwrap();
        nodes.get("node-b").await.expect("built once, kept");
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_an_error_per_request_not_at_build() {
        // A port nothing listens on: bind, note it, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"), "");
        let client = build(Some(&path)).await.expect("building does not connect");
        let msg = error_chain(&Api::<Node>::all(client).get("n").await.unwrap_err());
        assert!(msg.contains("onnection refused"), "{msg}");
    }
}
