//! Samples this device's CPU, RAM and NVIDIA GPUs for the heartbeat, so the hub can
//! show load and, later, route work to the least busy device.
//!
//! GPUs come from NVML, loaded at run time: a machine without the NVIDIA driver says
//! "no GPU" once in the log and reports an empty GPU list; it never fails or retries
//! the library every sample.

use std::time::Duration;

use adi_protocol::{GpuReport, LoadReport};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Reads load figures; holds the open NVML handle, if there is one.
pub struct Probe {
    system: System,
    nvml: Option<Nvml>,
}

impl Probe {
    /// Opens the probe: NVML if the driver is there, "no GPU" (once) if not.
    pub fn open() -> Self {
        Self::open_logged(true)
    }

    /// Opens the probe, saying what it found only if `log`: the cocoon's periodic
    /// probe says it, a one-off check does not repeat it.
    fn open_logged(log: bool) -> Self {
        let nvml = match Nvml::init() {
            Ok(n) => {
                let count = n.device_count().unwrap_or(0);
                if log {
                    info!(gpus = count, "NVML loaded");
                }
                Some(n)
            }
            Err(e) => {
                if log {
                    info!("no GPU: NVML is not available ({e})");
                }
                None
            }
        };
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Probe { system, nvml }
    }

    /// One sample. CPU use is measured since the previous call.
    pub fn sample(&mut self) -> LoadReport {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        LoadReport {
            cpu_count: u32::try_from(self.system.cpus().len()).unwrap_or(u32::MAX),
            cpu_percent: self.system.global_cpu_usage(),
            ram_total_bytes: self.system.total_memory(),
            ram_used_bytes: self.system.used_memory(),
            gpus: self.gpus(),
        }
    }

    fn gpus(&self) -> Vec<GpuReport> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok();
                Some(GpuReport {
                    index,
                    name: device.name().unwrap_or_default(),
                    uuid: device.uuid().unwrap_or_default(),
                    memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
                    memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
                    utilization_percent: device.utilization_rates().map_or(0, |u| u.gpu),
                    temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
                })
            })
            .collect()
    }
}

/// Whether a sample shows a GPU this device can run `gpu` tasks on: NVML listed at
/// least one, and answered for it.
pub fn has_gpu(report: &LoadReport) -> bool {
    !report.gpus.is_empty()
}

/// Opens the probe and takes a first sample whose CPU figure means something (CPU use
/// is measured between two readings, so it waits the shortest interval that gives a
/// real one); blocking. The cocoon registers with this sample, so its hardware and load
/// are known from its first moment online instead of a heartbeat later.
pub(crate) fn open_sampled() -> (Probe, LoadReport) {
    let mut probe = Probe::open();
    std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
    let first = probe.sample();
    (probe, first)
}

/// Samples every `every` on a blocking thread; the channel holds the latest sample,
/// starting with `opened`'s when given (else the probe is opened here).
pub(crate) fn spawn(
    opened: Option<(Probe, LoadReport)>,
    every: Duration,
    cancel: CancellationToken,
) -> watch::Receiver<Option<LoadReport>> {
    let (probe, first) = match opened {
        Some((probe, first)) => (Some(probe), Some(first)),
        None => (None, None),
    };
    let sampled = first.is_some();
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let probe = match probe {
            Some(p) => Ok(p),
            None => tokio::task::spawn_blocking(Probe::open).await,
        };
        let Ok(mut probe) = probe else {
            warn!("load probe could not start");
            return;
        };
        // A sample taken just now is not taken again at once.
        let start = if sampled {
            tokio::time::Instant::now() + every
        } else {
            tokio::time::Instant::now()
        };
        let mut ticker = tokio::time::interval_at(start, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match tokio::task::spawn_blocking(move || {
                let sample = probe.sample();
                (probe, sample)
            })
            .await
            {
                Ok((p, sample)) => {
                    probe = p;
                    tx.send_replace(Some(sample));
                }
                Err(_) => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_has_a_gpu_when_nvml_lists_one() {
        let mut report = LoadReport {
            cpu_count: 8,
            ram_total_bytes: 1 << 30,
            ..LoadReport::default()
        };
        assert!(!has_gpu(&report), "no GPU listed");
        report.gpus.push(GpuReport {
            index: 0,
            name: "NVIDIA H200".into(),
            memory_total_bytes: 141 << 30,
            ..GpuReport::default()
        });
        assert!(has_gpu(&report));
    }

    /// The real path: NVML on this machine agrees with `nvidia-smi -L` (no driver, no
    /// GPU: both say none).
    #[test]
    fn gpu_detection_agrees_with_nvidia_smi() {
        let listed = gpus_nvidia_smi_lists();
        let sample = Probe::open().sample();
        assert_eq!(
            has_gpu(&sample),
            listed > 0,
            "nvidia-smi lists {listed} GPUs"
        );
    }

    /// The GPUs `nvidia-smi -L` lists: the driver's own account, independent of NVML
    /// as this crate uses it; 0 without a driver.
    fn gpus_nvidia_smi_lists() -> usize {
        std::process::Command::new("nvidia-smi")
            .arg("-L")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map_or(0, |o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("GPU "))
                    .count()
            })
    }

    #[test]
    fn this_machine_reports_cpus_and_ram() {
        let mut probe = Probe::open();
        let first = probe.sample();
        assert!(first.cpu_count >= 1);
        assert!(first.ram_total_bytes > 0);
        assert!(first.ram_used_bytes <= first.ram_total_bytes);
        let second = probe.sample();
        assert!(
            (0.0..=100.0).contains(&second.cpu_percent),
            "{}",
            second.cpu_percent
        );
        // Exactly the GPUs the driver lists (none without one), each with a name, a
        // uuid and memory figures that fit.
        assert_eq!(second.gpus.len(), gpus_nvidia_smi_lists(), "{second:?}");
        for g in &second.gpus {
            assert!(!g.name.is_empty());
            assert!(g.uuid.starts_with("GPU-"), "{}", g.uuid);
            assert!(g.memory_total_bytes > 0);
            assert!(g.memory_used_bytes <= g.memory_total_bytes);
            assert!(g.utilization_percent <= 100);
        }
    }
}
