//! The relay's metrics endpoint, scraped over real HTTP on 127.0.0.1.

use std::time::Duration;

use super::{wait_until, TestEnv};

/// The relay's metrics endpoint on a port picked for it (`--metrics-listen`).
pub struct MetricsEndpoint {
    /// `127.0.0.1:<port>`
    pub addr: String,
    http: reqwest::Client,
}

impl MetricsEndpoint {
    /// A free port on 127.0.0.1; turns `metrics.enabled` on in `env`'s config.
    pub fn enable(env: &mut TestEnv) -> MetricsEndpoint {
        env.config
            .set("metrics.enabled", true)
            .set("metrics.refresh_interval", "200ms");
        MetricsEndpoint {
            addr: format!("127.0.0.1:{}", crate::harness::free_port()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("http client"),
        }
    }

    /// The flag to pass to `serversync`.
    pub fn flag(&self) -> [&str; 2] {
        ["--metrics-listen", &self.addr]
    }

    /// `(status, body)` of `GET path`, `None` while nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://{}{path}", self.addr);
        let response = self.http.get(url).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// The value of an unlabelled sample, `None` while unreachable or absent.
    pub async fn sample(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .filter_map(|line| line.strip_prefix(name))
            .find_map(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    pub async fn wait_for_sample(&self, name: &str, value: f64, timeout: Duration) {
        wait_until(timeout, &format!("{name} {value}"), || async {
            self.sample(name).await == Some(value)
        })
        .await
    }

    pub async fn wait_for_status(&self, path: &str, status: u16, timeout: Duration) {
        wait_until(
            timeout,
            &format!("GET {path} answering {status}"),
            || async { self.get(path).await.is_some_and(|(s, _)| s == status) },
        )
        .await
    }
}
