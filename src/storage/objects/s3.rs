//! The S3 object backend: `object_store`'s `AmazonS3` over this crate's own hyper client
//! (rustls with `ring`, like every other TLS client here; `object_store`'s bundled reqwest
//! would bring `aws-lc-rs`, a second crypto provider and a C build). With an endpoint set,
//! requests are path-style (`http://host:port/bucket/key`), which every S3-protocol server
//! takes; without one they go to AWS. The bucket is created when missing.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector as HyperHttp;
use hyper_util::rt::TokioExecutor;
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest,
    HttpRequestBody, HttpResponse, HttpResponseBody, HttpService,
};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore as _, ObjectStoreExt as _, PutPayload, RetryConfig};

use super::{check_key, ObjectBackend, ObjectError, ObjectInfo};

/// How long one request may take to answer (its head); object_store retries after.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Checked S3 settings (`[storage]` of the config, see [`super::ObjectsConfig::parse`]).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Empty: AWS.
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .finish()
    }
}

impl S3Config {
    /// The base URL path-style requests go to.
    fn base_url(&self) -> String {
        if self.endpoint.is_empty() {
            format!("https://s3.{}.amazonaws.com", self.region)
        } else {
            self.endpoint.clone()
        }
    }
}

type Hyper = hyper_util::client::legacy::Client<HttpsConnector<HyperHttp>, HttpRequestBody>;

/// object_store's HTTP seam, served by hyper.
#[derive(Debug, Clone)]
struct HyperService {
    client: Hyper,
}

impl HyperService {
    fn new() -> HyperService {
        let provider = std::sync::Arc::new(crate::peer::http::ring_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(crate::peer::http::native_roots())
                    .with_no_client_auth()
            });
        let tls = match tls {
            Ok(t) => t,
            // ring supports the default versions; should it not, only https:// fails.
            Err(e) => {
                tracing::warn!(error = %e, "S3 TLS client configuration");
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }
        };
        let mut http = HyperHttp::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(REQUEST_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        HyperService { client }
    }
}

#[async_trait]
impl HttpService for HyperService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    HttpErrorKind::Connect
                } else {
                    HttpErrorKind::Request
                };
                return Err(HttpError::new(kind, e));
            }
            Err(e) => return Err(HttpError::new(HttpErrorKind::Timeout, e)),
        };
        Ok(resp.map(|body| {
            HttpResponseBody::new(body.map_err(|e| HttpError::new(HttpErrorKind::Request, e)))
        }))
    }
}

impl HttpConnector for HyperService {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.clone()))
    }
}

/// A bucket of an S3-protocol server.
#[derive(Debug)]
pub struct S3Objects {
    store: AmazonS3,
    describe: String,
}

fn backend<'a>(
    op: &'static str,
    key: &'a str,
) -> impl FnOnce(object_store::Error) -> ObjectError + 'a {
    move |e| match e {
        object_store::Error::NotFound { .. } => ObjectError::NotFound(key.to_string()),
        e => ObjectError::Backend {
            op,
            key: key.to_string(),
            message: e.to_string(),
        },
    }
}

impl S3Objects {
    /// Connects and creates the bucket if it is missing.
    pub async fn open(cfg: S3Config) -> Result<S3Objects, ObjectError> {
        let http = HyperService::new();
        create_bucket(&cfg, &http).await?;
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_http_connector(http)
            .with_retry(RetryConfig {
                max_retries: 4,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            });
        if !cfg.endpoint.is_empty() {
            b = b
                .with_endpoint(&cfg.endpoint)
                .with_allow_http(true)
                .with_virtual_hosted_style_request(false);
        }
        let store = b.build().map_err(|e| ObjectError::Config(e.to_string()))?;
        Ok(S3Objects {
            store,
            describe: format!("s3://{} at {}", cfg.bucket, cfg.base_url()),
        })
    }
}

/// `PUT /bucket` (path-style), signed; "already exists" / "already yours" are fine.
async fn create_bucket(cfg: &S3Config, http: &HyperService) -> Result<(), ObjectError> {
    let url = format!("{}/{}", cfg.base_url(), cfg.bucket);
    let fail = |message: String| ObjectError::Backend {
        op: "create bucket",
        key: cfg.bucket.clone(),
        message,
    };
    // Outside us-east-1 AWS wants the region in the body.
    let body = if cfg.region == "us-east-1" || !cfg.endpoint.is_empty() {
        Bytes::new()
    } else {
        Bytes::from(format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
            cfg.region
        ))
    };
    let mut req = http::Request::builder()
        .method(http::Method::PUT)
        .uri(&url)
        .body(HttpRequestBody::from(body))
        .map_err(|e| fail(e.to_string()))?;
    let cred = AwsCredential {
        key_id: cfg.access_key_id.clone(),
        secret_key: cfg.secret_access_key.clone(),
        token: None,
    };
    AwsAuthorizer::new(&cred, "s3", &cfg.region)
        .try_authorize(&mut req, None)
        .map_err(|e| fail(e.to_string()))?;
    let resp = http.call(req).await.map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if status.is_success()
        || text.contains("BucketAlreadyOwnedByYou")
        || text.contains("BucketAlreadyExists")
    {
        return Ok(());
    }
    Err(fail(format!(
        "{status}: {}",
        text.chars().take(300).collect::<String>()
    )))
}

fn path(key: &str) -> Result<ObjPath, ObjectError> {
    check_key(key)?;
    ObjPath::parse(key).map_err(|_| ObjectError::BadKey(key.to_string()))
}

#[async_trait]
impl ObjectBackend for S3Objects {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectError> {
        let p = path(key)?;
        self.store
            .put(&p, PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(backend("put", key))
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectError> {
        let p = path(key)?;
        let r = self.store.get(&p).await.map_err(backend("get", key))?;
        r.bytes().await.map_err(backend("get", key))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectError> {
        let p = path(key)?;
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        // A range past the end is cut at the end, as the file backend does.
        let size = self
            .store
            .head(&p)
            .await
            .map_err(backend("head", key))?
            .size;
        let end = range.end.min(size);
        if range.start >= end {
            return Ok(Bytes::new());
        }
        self.store
            .get_range(&p, range.start..end)
            .await
            .map_err(backend("get", key))
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>, ObjectError> {
        let p = path(dir)?;
        let r = self
            .store
            .list_with_delimiter(Some(&p))
            .await
            .map_err(backend("list", dir))?;
        let mut out: Vec<ObjectInfo> = r
            .objects
            .into_iter()
            .map(|m| ObjectInfo {
                key: m.location.to_string(),
                size: m.size,
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let p = path(key)?;
        match self.store.delete(&p).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend("delete", key)(e)),
        }
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn is_local(&self) -> bool {
        false
    }
}
