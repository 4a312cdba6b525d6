//! A job's filesystem: its private root (what its engine sees as `/`), the
//! workspaces bound into it from the host, its own disk, and the id maps
//! of the idmapped mounts that bring host directories in; the store of
//! project caches its disk can start from.

pub mod caches;
pub mod disk;
pub mod idmap;
pub mod root;
pub mod workspaces;
