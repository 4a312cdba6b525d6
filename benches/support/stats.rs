//! Order statistics shared by the benchmarks.
#![allow(dead_code)]

/// Value at quantile `p` (0..=1), nearest rank.
pub fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs per figure: BERTH_BENCH_RUNS, default 10.
pub fn runs() -> usize {
    std::env::var("BERTH_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// Seconds `docker <args>` takes with these variables, output discarded.
pub fn time_docker(env: &[(&str, String)], args: &[&str]) -> f64 {
    let t = std::time::Instant::now();
    let st = std::process::Command::new("docker")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "docker {args:?}");
    t.elapsed().as_secs_f64()
}
