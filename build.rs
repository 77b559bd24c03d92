// `sqlx::migrate!` embeds `migrations/` when the crate compiles: without this, a
// migration added since the last build would be left out of an incremental one.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
