//! Image services of the host that every job uses: the registry settings its
//! dockerd gets, the shared pull-through cache, and the archives preloaded
//! into it. The sandbox installs them into a job; they know nothing of jobs.

pub mod cache;
pub mod preload;
pub mod registries;
