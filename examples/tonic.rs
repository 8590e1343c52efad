//! Placeholder.
mod proto;
fn main() {}
