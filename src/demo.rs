//! `serversync demo`: being written.
pub async fn run(_keep: bool) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("demo: not yet available")
}
