//! placeholder until the lab lands
pub fn run(_exe: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}
