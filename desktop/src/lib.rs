//! The doctor's desktop app (egui/eframe). Not built yet: see issue #6. It will be a view over
//! `bedside-client-core`'s client handle and make no call decisions of its own.
