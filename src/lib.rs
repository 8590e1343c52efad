#![doc = include_str!("docs/crate.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod entry;
mod error;
mod fill;
mod future;
mod key;
mod layer;
pub mod policy;
mod service;
mod status;
pub mod store;

#[doc(inline)]
pub use body::FenceBody;
#[doc(inline)]
pub use error::{BoxError, ConfigError, StoreError};
#[doc(inline)]
pub use future::ResponseFuture;
#[doc(inline)]
pub use layer::{
    FenceLayer, FenceLayerBuilder, Stats, DEFAULT_MAX_BODY_SIZE, DEFAULT_NAMESPACE,
    DEFAULT_STORE_TIMEOUT, DEFAULT_TTL,
};
#[doc(inline)]
pub use service::FenceService;
#[doc(inline)]
pub use status::{CACHE_NAME, CACHE_STATUS};
