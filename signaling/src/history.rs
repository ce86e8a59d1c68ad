//! Each device's load over the last hour (CPU, RAM, and every GPU's utilisation and
//! memory), for the charts of its page in the web UI. It owns one bounded ring per
//! device, filled from heartbeats and kept in RAM only: it must never write to the
//! catalog, and it must never grow with time, only with the number of devices.
//!
//! A ring keeps a point per [`step`](LoadHistory::step) (the heartbeat interval, but at
//! least [`MIN_STEP`]), at most [`MAX_POINTS`] of them, which at the default five-second
//! heartbeat is one hour. A heartbeat within a step of the last point replaces it, so
//! the newest point always shows the latest report. Points are stored as columns of
//! small integers (about 10 bytes a point, and 5 more per GPU): a full hour of a device
//! without GPUs is about 7 KiB. A device silent for a whole window is forgotten at the
//! next [`prune`](LoadHistory::prune).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use adi_protocol::{DeviceId, LoadReport};
use dashmap::DashMap;
use serde::Serialize;

/// How far back a ring reaches.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// The shortest step between two points, whatever the heartbeat interval: a hub told
/// to heartbeat every 100 ms keeps no more points than one at the default.
pub const MIN_STEP: Duration = Duration::from_secs(5);
/// The most points a ring holds.
pub const MAX_POINTS: usize = 720;

const MIB: u64 = 1 << 20;
/// A GPU utilisation not reported at that point (the GPU was not there yet).
const NO_UTIL: u8 = u8::MAX;
/// A GPU memory figure not reported at that point.
const NO_MEM: u32 = u32::MAX;

/// Every device's recent load.
pub struct LoadHistory {
    rings: DashMap<DeviceId, Ring>,
    step_secs: u32,
    max_points: usize,
    /// When [`prune`](Self::prune) last looked, in Unix seconds.
    pruned_at: AtomicU64,
}

/// One device's points, column by column, oldest first.
#[derive(Default)]
struct Ring {
    /// Unix seconds of each point.
    at: VecDeque<u32>,
    /// CPU busy share in hundredths of a percent.
    cpu: VecDeque<u16>,
    /// RAM in use, MiB.
    ram_used: VecDeque<u32>,
    /// From the latest report.
    cpu_count: u32,
    ram_total_bytes: u64,
    gpus: Vec<GpuRing>,
}

struct GpuRing {
    uuid: Box<str>,
    index: u32,
    name: Box<str>,
    memory_total_bytes: u64,
    /// Percent, [`NO_UTIL`] where not reported; aligned with [`Ring::at`].
    util: VecDeque<u8>,
    /// MiB, [`NO_MEM`] where not reported; aligned with [`Ring::at`].
    mem_used: VecDeque<u32>,
}

/// A device's recent load as the API shows it: one array per figure, aligned with `at`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryView {
    /// The device.
    pub device_id: DeviceId,
    /// Seconds between points.
    pub step_secs: u32,
    /// How far back the points reach, at most.
    pub window_secs: u64,
    /// Logical CPUs, from the latest report.
    pub cpu_count: u32,
    /// Bytes of RAM, from the latest report.
    pub ram_total_bytes: u64,
    /// Unix milliseconds of each point, oldest first.
    pub at: Vec<u64>,
    /// CPU busy share at each point, 0–100.
    pub cpu_percent: Vec<f32>,
    /// Bytes of RAM in use at each point (to the MiB).
    pub ram_used_bytes: Vec<u64>,
    /// Each GPU of the latest report, with its figures at each point.
    pub gpus: Vec<GpuHistoryView>,
}

/// One GPU's recent load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuHistoryView {
    /// NVML index.
    pub index: u32,
    /// Model name.
    pub name: String,
    /// Bytes of VRAM.
    pub memory_total_bytes: u64,
    /// Utilisation at each point, 0–100; `null` before the GPU was reported.
    pub utilization_percent: Vec<Option<u8>>,
    /// Bytes of VRAM in use at each point (to the MiB); `null` before it was reported.
    pub memory_used_bytes: Vec<Option<u64>>,
}

impl LoadHistory {
    /// Rings for devices heartbeating every `heartbeat_interval`.
    pub fn new(heartbeat_interval: Duration) -> Self {
        let step = heartbeat_interval.max(MIN_STEP);
        let step_secs = u32::try_from(step.as_secs()).unwrap_or(u32::MAX).max(1);
        let per_window = WINDOW.as_secs().div_ceil(u64::from(step_secs));
        LoadHistory {
            rings: DashMap::new(),
            step_secs,
            max_points: usize::try_from(per_window)
                .unwrap_or(MAX_POINTS)
                .clamp(1, MAX_POINTS),
            pruned_at: AtomicU64::new(0),
        }
    }

    /// The time between two points.
    pub fn step(&self) -> Duration {
        Duration::from_secs(u64::from(self.step_secs))
    }

    /// Notes `load`, reported by `id` at `now_unix_ms`.
    pub fn record(&self, id: &DeviceId, load: &LoadReport, now_unix_ms: u64) {
        let at = u32::try_from(now_unix_ms / 1000).unwrap_or(u32::MAX);
        // The device's ring exists after its first heartbeat: no key to clone after that.
        match self.rings.get_mut(id) {
            Some(mut ring) => ring.record(load, at, self.step_secs, self.max_points),
            None => self.rings.entry(id.clone()).or_default().record(
                load,
                at,
                self.step_secs,
                self.max_points,
            ),
        }
    }

    /// The device's points within the window before `now_unix_ms`; `None` if it has
    /// reported no load in that time.
    pub fn view(&self, id: &DeviceId, now_unix_ms: u64) -> Option<HistoryView> {
        let since = now_unix_ms.saturating_sub(window_ms()) / 1000;
        let ring = self.rings.get(id)?;
        let skip = ring
            .at
            .iter()
            .take_while(|&&t| u64::from(t) < since)
            .count();
        if skip == ring.at.len() {
            return None;
        }
        Some(HistoryView {
            device_id: id.clone(),
            step_secs: self.step_secs,
            window_secs: WINDOW.as_secs(),
            cpu_count: ring.cpu_count,
            ram_total_bytes: ring.ram_total_bytes,
            at: ring
                .at
                .iter()
                .skip(skip)
                .map(|&t| u64::from(t) * 1000)
                .collect(),
            cpu_percent: ring
                .cpu
                .iter()
                .skip(skip)
                .map(|&c| f32::from(c) / 100.0)
                .collect(),
            ram_used_bytes: ring
                .ram_used
                .iter()
                .skip(skip)
                .map(|&m| u64::from(m) * MIB)
                .collect(),
            gpus: ring
                .gpus
                .iter()
                .map(|g| GpuHistoryView {
                    index: g.index,
                    name: g.name.to_string(),
                    memory_total_bytes: g.memory_total_bytes,
                    utilization_percent: g
                        .util
                        .iter()
                        .skip(skip)
                        .map(|&u| (u != NO_UTIL).then_some(u))
                        .collect(),
                    memory_used_bytes: g
                        .mem_used
                        .iter()
                        .skip(skip)
                        .map(|&m| (m != NO_MEM).then(|| u64::from(m) * MIB))
                        .collect(),
                })
                .collect(),
        })
    }

    /// Forgets a device (deleted from the hub).
    pub fn forget(&self, id: &DeviceId) {
        self.rings.remove(id);
    }

    /// Forgets the devices that reported nothing for a whole window; looks at most
    /// once a minute, however often it is called. Returns how many it forgot.
    pub fn prune(&self, now_unix_ms: u64) -> usize {
        let now = now_unix_ms / 1000;
        let last = self.pruned_at.load(Ordering::Relaxed);
        if now < last.saturating_add(60)
            || self
                .pruned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return 0;
        }
        let since = now.saturating_sub(WINDOW.as_secs());
        let before = self.rings.len();
        self.rings
            .retain(|_, ring| ring.at.back().is_some_and(|&t| u64::from(t) >= since));
        before - self.rings.len()
    }

    /// How many devices have a ring.
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    /// Whether no device has a ring.
    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }
}

/// Now, in Unix milliseconds: the clock of the points, which the UI shows as times.
pub fn now_ms() -> u64 {
    u64::try_from(crate::auth::unix_now_ms()).unwrap_or(0)
}

fn window_ms() -> u64 {
    u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX)
}

fn mib(bytes: u64) -> u32 {
    u32::try_from(bytes / MIB).unwrap_or(NO_MEM - 1)
}

/// Grows a column by a few more slots than needed, never past `max`: a `VecDeque`
/// left to itself would double to 1,024 slots for 720 points.
fn reserve<T>(col: &mut VecDeque<T>, max: usize) {
    if col.len() == col.capacity() && col.len() < max {
        let more = col.len().clamp(8, 128).min(max - col.len());
        col.reserve_exact(more);
    }
}

fn push<T>(col: &mut VecDeque<T>, value: T, max: usize) {
    reserve(col, max);
    col.push_back(value);
    while col.len() > max {
        col.pop_front();
    }
}

fn set_last<T>(col: &mut VecDeque<T>, value: T) {
    if let Some(last) = col.back_mut() {
        *last = value;
    }
}

impl Ring {
    fn record(&mut self, load: &LoadReport, at: u32, step: u32, max: usize) {
        self.cpu_count = load.cpu_count;
        self.ram_total_bytes = load.ram_total_bytes;
        self.match_gpus(load);
        // Percent in hundredths: the report is already clamped to 0–100.
        let cpu = (load.cpu_percent.clamp(0.0, 100.0) * 100.0).round() as u16;
        let ram = mib(load.ram_used_bytes);
        let replace = self
            .at
            .back()
            .is_some_and(|&last| at >= last && at - last < step);
        if replace {
            set_last(&mut self.cpu, cpu);
            set_last(&mut self.ram_used, ram);
        } else {
            push(&mut self.at, at, max);
            push(&mut self.cpu, cpu, max);
            push(&mut self.ram_used, ram, max);
        }
        let len = self.at.len();
        for (ring, gpu) in self.gpus.iter_mut().zip(&load.gpus) {
            let util = u8::try_from(gpu.utilization_percent.min(100)).unwrap_or(100);
            let used = mib(gpu.memory_used_bytes);
            if replace && ring.util.len() == len {
                set_last(&mut ring.util, util);
                set_last(&mut ring.mem_used, used);
            } else {
                push(&mut ring.util, util, max);
                push(&mut ring.mem_used, used, max);
            }
        }
    }

    /// Makes the GPU columns those of `load`, in its order: a GPU seen before keeps
    /// its points; a new one (or one that was gone a while) starts with gaps as long as
    /// the ring, so every column stays aligned with the times.
    fn match_gpus(&mut self, load: &LoadReport) {
        let same = self.gpus.len() == load.gpus.len()
            && self
                .gpus
                .iter()
                .zip(&load.gpus)
                .all(|(r, g)| *r.uuid == *g.uuid);
        if !same {
            let mut old = std::mem::take(&mut self.gpus);
            let len = self.at.len();
            self.gpus = load
                .gpus
                .iter()
                .map(|g| match old.iter().position(|r| *r.uuid == *g.uuid) {
                    Some(i) => old.swap_remove(i),
                    None => GpuRing {
                        uuid: g.uuid.as_str().into(),
                        index: g.index,
                        name: g.name.as_str().into(),
                        memory_total_bytes: g.memory_total_bytes,
                        util: std::iter::repeat_n(NO_UTIL, len).collect(),
                        mem_used: std::iter::repeat_n(NO_MEM, len).collect(),
                    },
                })
                .collect();
        }
        for (ring, g) in self.gpus.iter_mut().zip(&load.gpus) {
            ring.index = g.index;
            ring.memory_total_bytes = g.memory_total_bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adi_protocol::GpuReport;

    const GIB: u64 = 1 << 30;

    fn load(cpu: f32, ram_gib: u64, gpus: &[(&str, u32, u64)]) -> LoadReport {
        LoadReport {
            cpu_count: 8,
            cpu_percent: cpu,
            ram_total_bytes: 32 * GIB,
            ram_used_bytes: ram_gib * GIB,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, (uuid, util, mem))| GpuReport {
                    index: u32::try_from(i).unwrap_or(0),
                    name: "NVIDIA H100".into(),
                    uuid: (*uuid).into(),
                    memory_total_bytes: 80 * GIB,
                    memory_used_bytes: mem * GIB,
                    utilization_percent: *util,
                    temperature_c: None,
                })
                .collect(),
        }
    }

    fn dev(b: u8) -> DeviceId {
        DeviceId::from_mac(&[b; 16])
    }

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn one_point_per_step_the_newest_showing_the_latest_report() {
        let h = LoadHistory::new(Duration::from_secs(5));
        let d = dev(1);
        h.record(&d, &load(10.0, 4, &[]), T0);
        h.record(&d, &load(20.0, 5, &[]), T0 + 2_000);
        let v = h.view(&d, T0 + 2_000).expect("points");
        assert_eq!(v.at, [T0]);
        assert_eq!(v.cpu_percent, [20.0], "the latest within a step wins");
        assert_eq!(v.ram_used_bytes, [5 * GIB]);
        h.record(&d, &load(30.5, 6, &[]), T0 + 5_000);
        let v = h.view(&d, T0 + 5_000).expect("points");
        assert_eq!(v.at, [T0, T0 + 5_000]);
        assert_eq!(v.cpu_percent, [20.0, 30.5]);
        assert_eq!(
            (v.cpu_count, v.ram_total_bytes, v.step_secs),
            (8, 32 * GIB, 5)
        );
        assert!(h.view(&dev(2), T0).is_none(), "a device never heard of");
    }

    #[test]
    fn a_ring_holds_one_hour_and_never_more_however_fast_devices_heartbeat() {
        let fast = LoadHistory::new(Duration::from_millis(100));
        assert_eq!(fast.step(), MIN_STEP, "a 100 ms heartbeat keeps 5 s points");
        let d = dev(1);
        // Two hours of heartbeats every 100 ms.
        for i in 0..72_000u64 {
            fast.record(&d, &load(1.0, 1, &[("GPU-a", 5, 1)]), T0 + i * 100);
        }
        let end = T0 + 72_000 * 100;
        let v = fast.view(&d, end).expect("points");
        assert_eq!(v.at.len(), MAX_POINTS);
        assert!(
            v.at.iter().all(|&t| t + window_ms() >= end),
            "older than an hour"
        );
        assert_eq!(v.gpus[0].utilization_percent.len(), MAX_POINTS);
        // A slow heartbeat keeps as many points as fit in an hour.
        let slow = LoadHistory::new(Duration::from_secs(60));
        for i in 0..200u64 {
            slow.record(&d, &load(1.0, 1, &[]), T0 + i * 60_000);
        }
        let v = slow.view(&d, T0 + 199 * 60_000).expect("points");
        assert_eq!(v.at.len(), 60);
    }

    #[test]
    fn gpus_keep_their_points_by_uuid_and_a_new_one_starts_with_gaps() {
        let h = LoadHistory::new(Duration::from_secs(5));
        let d = dev(1);
        h.record(&d, &load(1.0, 1, &[("GPU-a", 40, 10)]), T0);
        h.record(&d, &load(1.0, 1, &[("GPU-a", 50, 11)]), T0 + 5_000);
        // A second GPU appears, listed first.
        h.record(
            &d,
            &load(1.0, 1, &[("GPU-b", 90, 70), ("GPU-a", 60, 12)]),
            T0 + 10_000,
        );
        let v = h.view(&d, T0 + 10_000).expect("points");
        assert_eq!(v.gpus.len(), 2);
        assert_eq!(v.gpus[0].utilization_percent, [None, None, Some(90)]);
        assert_eq!(v.gpus[0].memory_used_bytes, [None, None, Some(70 * GIB)]);
        assert_eq!(
            v.gpus[1].utilization_percent,
            [Some(40), Some(50), Some(60)]
        );
        assert_eq!(v.gpus[1].index, 1);
        // It goes, and comes back: it starts again, every column still aligned.
        h.record(&d, &load(1.0, 1, &[("GPU-a", 61, 12)]), T0 + 15_000);
        h.record(
            &d,
            &load(1.0, 1, &[("GPU-a", 62, 12), ("GPU-b", 91, 70)]),
            T0 + 20_000,
        );
        let v = h.view(&d, T0 + 20_000).expect("points");
        assert_eq!(v.at.len(), 5);
        for g in &v.gpus {
            assert_eq!(g.utilization_percent.len(), 5, "{g:?}");
            assert_eq!(g.memory_used_bytes.len(), 5, "{g:?}");
        }
        assert_eq!(
            v.gpus[1].utilization_percent,
            [None, None, None, None, Some(91)]
        );
    }

    #[test]
    fn a_device_silent_for_an_hour_is_forgotten_and_a_deleted_one_at_once() {
        let h = LoadHistory::new(Duration::from_secs(5));
        h.record(&dev(1), &load(1.0, 1, &[]), T0);
        h.record(&dev(2), &load(1.0, 1, &[]), T0 + 3_000_000);
        h.record(&dev(3), &load(1.0, 1, &[]), T0 + 3_000_000);
        let later = T0 + window_ms() + 1_000;
        assert!(h.view(&dev(1), later).is_none(), "nothing within the hour");
        assert_eq!(h.prune(later), 1);
        assert_eq!(h.prune(later + 1_000), 0, "at most once a minute");
        assert_eq!(h.len(), 2);
        h.forget(&dev(3));
        assert_eq!(h.len(), 1);
        assert!(h.view(&dev(2), later).is_some());
    }
}
