//! Shared by the desktop UI tests.
pub mod raster;
