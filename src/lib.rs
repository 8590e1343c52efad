#![doc = include_str!("docs/crate.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod breaker;
mod entry;
mod error;
mod flow;
mod future;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod http_date;
pub mod invalidate;
mod key;
mod layer;
pub mod metrics;
mod owed;
pub mod policy;
pub mod purge;
mod range;
mod recent;
mod respond;
mod service;
mod shared;
mod singleflight;
mod status;
pub mod store;
mod store_client;
mod unreachable;
mod validation;
mod vary;

#[doc(inline)]
pub use body::FenceBody;
#[doc(inline)]
pub use error::{BoxError, ConfigError, StoreError};
#[doc(inline)]
pub use future::ResponseFuture;
#[doc(inline)]
pub use invalidate::Invalidator;
#[doc(inline)]
pub use layer::{
    FenceLayer, FenceLayerBuilder, DEFAULT_BREAKER_COOL_DOWN, DEFAULT_BREAKER_FAILURES,
    DEFAULT_FILL_POLL_INTERVAL, DEFAULT_GRPC_MAX_REQUEST, DEFAULT_GRPC_READ_TIMEOUT,
    DEFAULT_HIT_FOR_MISS_TTL, DEFAULT_INVALIDATION_ATTEMPTS, DEFAULT_INVALIDATION_QUEUE,
    DEFAULT_INVALIDATION_TIMEOUT, DEFAULT_KEEP, DEFAULT_LEASE_TTL, DEFAULT_MAX_BODY_SIZE,
    DEFAULT_NAMESPACE, DEFAULT_REBUILD_TIMEOUT, DEFAULT_STORE_TIMEOUT, DEFAULT_TAG_HEADER,
    DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, DEFAULT_WRITE_BUDGET, DEFAULT_XFETCH_BETA,
};
#[doc(inline)]
pub use service::FenceService;
#[doc(inline)]
pub use shared::{Clock, Stats};
#[doc(inline)]
pub use status::{CacheOutcome, Served, CACHE_NAME, CACHE_STATUS};
#[doc(inline)]
pub use unreachable::OriginUnreachable;
