//! A hand-written `demo.Users` gRPC service: its messages (`prost`
//! derives), a tonic server and a tonic client, as `tonic-prost-build`
//! would generate them from
//!
//! ```proto
//! syntax = "proto3";
//! package demo;
//! message GetRequest { string id = 1; }
//! message PutRequest { string id = 1; string name = 2; }
//! message User { string id = 1; string name = 2; uint64 version = 3; }
//! service Users {
//!   rpc Get(GetRequest) returns (User);              // unary, cached
//!   rpc Put(PutRequest) returns (User);              // unary, invalidates
//!   rpc Watch(GetRequest) returns (stream User);     // server-streaming
//! }
//! ```
//!
//! Written by hand so that building needs no `protoc`. Shared with
//! `tests/grpc.rs`.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codec::CompressionEncoding;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// `demo.GetRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetRequest {
    #[prost(string, tag = "1")]
    pub id: String,
}

/// `demo.PutRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
}

/// `demo.User`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct User {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint64, tag = "3")]
    pub version: u64,
}

/// The stream `Watch` answers with.
pub type UserStream = Pin<Box<dyn futures_util::Stream<Item = Result<User, Status>> + Send>>;

/// What a method answers, later.
pub type Answer<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

/// What the service does: implemented by the example and the tests.
pub trait Users: Send + Sync + 'static {
    fn get(&self, request: Request<GetRequest>) -> Answer<User>;
    fn put(&self, request: Request<PutRequest>) -> Answer<User>;
    fn watch(&self, request: Request<GetRequest>) -> Answer<UserStream>;
}

/// The tonic server of a [`Users`] implementation.
pub struct UsersServer<T> {
    inner: Arc<T>,
    gzip: bool,
}

impl<T> Clone for UsersServer<T> {
    fn clone(&self) -> Self {
        UsersServer {
            inner: self.inner.clone(),
            gzip: self.gzip,
        }
    }
}

impl<T: Users> UsersServer<T> {
    pub fn new(inner: T) -> Self {
        Self::from_arc(Arc::new(inner))
    }

    pub fn from_arc(inner: Arc<T>) -> Self {
        UsersServer { inner, gzip: false }
    }

    /// Accepts gzip-compressed requests and compresses responses when the
    /// client accepts gzip.
    pub fn gzip(mut self) -> Self {
        self.gzip = true;
        self
    }

    fn grpc<Req, Res>(&self) -> tonic::server::Grpc<ProstCodec<Res, Req>>
    where
        Req: prost::Message + Default + Send + 'static,
        Res: prost::Message + Send + 'static,
    {
        let grpc = tonic::server::Grpc::new(ProstCodec::default());
        if self.gzip {
            grpc.accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
        } else {
            grpc
        }
    }
}

impl<T> tonic::server::NamedService for UsersServer<T> {
    const NAME: &'static str = "demo.Users";
}

impl<T, B> Service<http::Request<B>> for UsersServer<T>
where
    T: Users,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        match req.uri().path() {
            "/demo.Users/Get" => {
                let mut grpc = self.grpc::<GetRequest, User>();
                let method = tower::service_fn(move |r| inner.get(r));
                Box::pin(async move { Ok(grpc.unary(method, req).await) })
            }
            "/demo.Users/Put" => {
                let mut grpc = self.grpc::<PutRequest, User>();
                let method = tower::service_fn(move |r| inner.put(r));
                Box::pin(async move { Ok(grpc.unary(method, req).await) })
            }
            "/demo.Users/Watch" => {
                let mut grpc = self.grpc::<GetRequest, User>();
                let method = tower::service_fn(move |r| inner.watch(r));
                Box::pin(async move { Ok(grpc.server_streaming(method, req).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// A tonic client of `demo.Users`.
#[derive(Clone)]
pub struct UsersClient {
    inner: tonic::client::Grpc<tonic::transport::Channel>,
}

impl UsersClient {
    pub async fn connect(url: String) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::new(url)?.connect().await?;
        Ok(Self::new(channel))
    }

    pub fn new(channel: tonic::transport::Channel) -> Self {
        UsersClient {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    /// Sends gzip-compressed requests and accepts gzip-compressed responses.
    pub fn gzip(mut self) -> Self {
        self.inner = self
            .inner
            .send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip);
        self
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("service was not ready: {e}")))
    }

    pub async fn get(&mut self, request: Request<GetRequest>) -> Result<Response<User>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/demo.Users/Get");
        self.inner.unary(request, path, ProstCodec::default()).await
    }

    pub async fn put(&mut self, request: Request<PutRequest>) -> Result<Response<User>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/demo.Users/Put");
        self.inner.unary(request, path, ProstCodec::default()).await
    }

    pub async fn watch(
        &mut self,
        request: Request<GetRequest>,
    ) -> Result<Response<tonic::Streaming<User>>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/demo.Users/Watch");
        self.inner
            .server_streaming(request, path, ProstCodec::default())
            .await
    }
}
