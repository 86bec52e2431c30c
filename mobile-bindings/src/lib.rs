//! uniffi bindings for the patient apps (Kotlin and Swift). Not built yet: see issue #7. The
//! crate will wrap `bedside-client-core`'s client handle and make no decisions of its own.
