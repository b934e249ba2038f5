use super::*;

/// A device that receives the frames queued in it and sends nowhere.
struct Queue(VecDeque<Vec<u8>>);

struct Sink;

impl phy::TxToken for Sink {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        f(&mut vec![0; len])
    }
}

impl Device for Queue {
    type RxToken<'a> = OwnedRx;
    type TxToken<'a> = Sink;

    fn receive(&mut self, _: Instant) -> Option<(OwnedRx, Sink)> {
        self.0.pop_front().map(|frame| (OwnedRx(frame), Sink))
    }

    fn transmit(&mut self, _: Instant) -> Option<Sink> {
        Some(Sink)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities::default()
    }
}

/// Frames 0..count through `faults`: what the stack receives.
fn through(faults: Faults, count: u8, seed: u64) -> Vec<Vec<u8>> {
    let frames = (0..count).map(|i| vec![i; 64]).collect();
    let mut device = FaultyDevice::new(Queue(frames), faults, seed);
    let mut out = Vec::new();
    for _ in 0..4 * usize::from(count) + 10 {
        if let Some((rx, _)) = device.receive(Instant::from_millis(0)) {
            out.push(phy::RxToken::consume(rx, |bytes| bytes.to_vec()));
        }
    }
    // A frame still held back for reordering comes once it has waited.
    std::thread::sleep(HOLD_AT_MOST);
    while let Some((rx, _)) = device.receive(Instant::from_millis(0)) {
        out.push(phy::RxToken::consume(rx, |bytes| bytes.to_vec()));
    }
    out
}

fn firsts(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.iter().map(|frame| frame[0]).collect()
}

#[test]
fn no_faults_deliver_every_frame_in_order() {
    assert_eq!(firsts(&through(Faults::default(), 50, 1)), (0..50).collect::<Vec<u8>>());
}

#[test]
fn each_fault_does_what_it_says() {
    assert!(through(Faults { drop: 1.0, ..Default::default() }, 50, 1).is_empty());
    let doubled = firsts(&through(Faults { duplicate: 1.0, ..Default::default() }, 10, 1));
    assert_eq!(doubled, (0..10).flat_map(|i| [i, i]).collect::<Vec<u8>>());
    // Every frame held back behind the next one: pairs swap.
    let swapped = firsts(&through(Faults { reorder: 1.0, ..Default::default() }, 6, 1));
    assert_eq!(swapped, vec![1, 0, 3, 2, 5, 4]);
    // Frame i is 64 bytes of i: a corrupted one differs from that in exactly one bit.
    for (i, frame) in through(Faults { corrupt: 1.0, ..Default::default() }, 20, 1).iter().enumerate() {
        let bits: u32 = frame.iter().map(|&b| (b ^ i as u8).count_ones()).sum();
        assert_eq!(bits, 1, "frame {i}: {frame:?}");
    }
}

#[test]
fn a_chance_is_honoured_and_the_seed_repeats_it() {
    let faults = Faults { drop: 0.1, ..Default::default() };
    let first = through(faults, 200, 42);
    assert_eq!(first, through(faults, 200, 42), "the same seed, the same faults");
    let lost = 200 - first.len();
    assert!((5..=40).contains(&lost), "10% of 200 frames dropped, give or take: {lost}");
}

#[test]
fn a_blackout_drops_everything_for_its_length() {
    let blackout = Blackout { after: Duration::ZERO, length: Duration::from_secs(60) };
    assert!(through(Faults { blackout: Some(blackout), ..Default::default() }, 20, 1).is_empty());
    let over = Blackout { after: Duration::ZERO, length: Duration::ZERO };
    assert_eq!(through(Faults { blackout: Some(over), ..Default::default() }, 20, 1).len(), 20);
}
