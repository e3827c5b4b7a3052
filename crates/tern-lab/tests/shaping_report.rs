//! Measures single-stream TCP goodput through the lab at several rates and prints a table.
//! Not a pass/fail test of the suite (it takes ~15 s and wants an idle machine):
//! `cargo test -p tern-lab --test shaping_report -- --ignored --nocapture`.

mod common;

use tern_lab::{Lab, LabSpec, LinkRate};

#[test]
#[ignore = "measurement, run by hand on an idle machine"]
fn shaping_report() {
    let name = common::lab_name("report");
    let mut lab = Lab::up_guarded(&LabSpec {
        name: name.clone(),
        hosts: 2,
        ..LabSpec::default()
    })
    .unwrap();
    println!("{:>10} {:>12} {:>8}", "limit", "measured", "ratio");
    for (rate, mb) in [
        (Some("10mbit"), 2usize),
        (Some("100mbit"), 8),
        (Some("300mbit"), 24),
        (Some("1gbit"), 100),
        (Some("2gbit"), 200),
        (Some("5gbit"), 400),
        (Some("10gbit"), 600),
        (None, 600),
    ] {
        let rate: Option<LinkRate> = rate.map(|r| r.parse().unwrap());
        lab.set_link_rate("h1", rate).unwrap();
        lab.set_link_rate("h2", rate).unwrap();
        let bps = common::measure_throughput(&lab, "h1", "h2", mb * 1024 * 1024);
        let ratio = rate
            .map(|r| format!("{:.3}", bps / r.bits_per_sec() as f64))
            .unwrap_or_else(|| "-".to_string());
        println!(
            "{:>10} {:>9.1} Mb {:>8}",
            rate.map(|r| r.to_string()).unwrap_or_else(|| "none".into()),
            bps / 1e6,
            ratio
        );
    }
    drop(lab);
    common::assert_no_leftovers(&name);
}
