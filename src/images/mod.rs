//! Image services of the host that every job uses: the registry settings its
//! dockerd gets, the shared pull-through cache, and the archives preloaded
//! into it. The sandbox installs them into each job.

pub mod cache;
pub mod preload;
pub mod registries;

/// Why a URL (the cache's upstream, a mirror) does not parse.
pub type UrlError = <reqwest::Url as std::str::FromStr>::Err;
