//! Stream positions handed out from memory, without a lock held across the writes that use them.
//!
//! Writers take a position, write their batch (which records the position), and publish it.
//! Positions are taken in increasing order but their writes finish in any order, so readers
//! (`/sync`, the notifier) use only the *completed* mark: the highest position below which every
//! position taken has been published or abandoned. Everything a reader can be told about up to
//! the mark is visible in the store by then.
//!
//! No position is handed out twice, even after a power loss or by two processes sharing a store:
//! values come from blocks claimed on disk with a synced, conditional write of the counter's
//! reservation (`counters` row `0xFF name`), one fsync per [`COUNTER_RESERVATION_BLOCK`] values.
//! A block starts past the stored reservation, so a restart (or another process) starts past
//! every value a client may have seen; `recover_counters` keeps working for the plain counters.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OnceCell, watch};

use crate::kv::{KvStore, WriteBatch};
use crate::typed::counter_value;
use crate::{COUNTER_RESERVATION_BLOCK, StorageError, Table};

/// How often claiming a block is retried when another claimer keeps winning the race.
const CLAIM_RETRIES: usize = 64;

/// The positions of one named stream, for one process.
#[derive(Clone)]
pub struct StreamPositions {
    inner: Arc<Inner>,
}

struct Inner {
    kv: Arc<dyn KvStore>,
    name: String,
    /// Another stream this one starts above (see [`StreamPositions::above`]).
    floor: Option<String>,
    state: Mutex<State>,
    /// Reads the stored reservation once, before the first position or mark.
    started: OnceCell<()>,
    /// One block claim at a time; other takers wait for it instead of claiming blocks of their own.
    claiming: tokio::sync::Mutex<()>,
    completed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// The last position handed out (or, before the first, where this process started).
    last: u64,
    /// The end of the claimed block: positions up to it may be handed out without another claim.
    block_end: u64,
    /// Positions handed out and not yet published or abandoned.
    in_flight: BTreeSet<u64>,
}

impl State {
    fn completed(&self) -> u64 {
        self.in_flight.first().map_or(self.last, |first| first - 1)
    }
}

/// A taken position. Publish it with [`StreamPosition::published`] once the write that records
/// it succeeded (or, for in-memory changes, once they are made); dropping it abandons it.
#[must_use = "a position holds back every reader until it is published or dropped"]
pub struct StreamPosition {
    value: u64,
    inner: Arc<Inner>,
    published: bool,
}

impl StreamPositions {
    pub fn new(kv: Arc<dyn KvStore>, name: &str) -> Self {
        Self::with_floor(kv, name, None)
    }

    /// A stream that starts above everything `floor` may have handed out: for a stream split off
    /// another, so that positions of the old shared stream (in clients' tokens and stored rows)
    /// stay below every position the new one hands out.
    pub fn above(kv: Arc<dyn KvStore>, name: &str, floor: &str) -> Self {
        Self::with_floor(kv, name, Some(floor.to_owned()))
    }

    fn with_floor(kv: Arc<dyn KvStore>, name: &str, floor: Option<String>) -> Self {
        let (completed, _) = watch::channel(0);
        let inner = Inner {
            kv,
            name: name.to_owned(),
            floor,
            state: Mutex::new(State::default()),
            started: OnceCell::new(),
            claiming: tokio::sync::Mutex::new(()),
            completed,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Takes the next position. Never blocks on other writers' writes; waits only for the
    /// synced write that claims a new block, once per block.
    pub async fn take(&self) -> Result<StreamPosition, StorageError> {
        self.inner.start().await?;
        loop {
            if let Some(value) = self.inner.take_in_block() {
                return Ok(StreamPosition { value, inner: self.inner.clone(), published: false });
            }
            let _claiming = self.inner.claiming.lock().await;
            if !self.inner.block_exhausted() {
                continue;
            }
            self.inner.claim_block().await?;
        }
    }

    /// The completed mark: every position up to it is published or abandoned.
    pub async fn completed(&self) -> Result<u64, StorageError> {
        self.inner.start().await?;
        Ok(*self.inner.completed.borrow())
    }
}

impl StreamPosition {
    pub fn get(&self) -> u64 {
        self.value
    }

    /// Marks the position's write done, then waits until the completed mark covers it: when this
    /// returns, every reader that looks sees the write, so the writer can wake them.
    pub async fn published(mut self) {
        self.published = true;
        self.inner.release(self.value);
        let mut completed = self.inner.completed.subscribe();
        // The sender lives in `inner`, which `self` keeps alive: this cannot fail.
        let _ = completed.wait_for(|mark| *mark >= self.value).await;
    }
}

impl Drop for StreamPosition {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        // Abandoned: the write failed, was never made, or its caller stopped waiting for it. In
        // that last case the batch may still be queued in the store, so the position is released
        // only after an empty write queued behind it is answered; writes are applied in order.
        let (inner, value) = (self.inner.clone(), self.value);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = inner.kv.write(WriteBatch::new()).await;
                    inner.release(value);
                });
            }
            Err(_) => inner.release(value),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    async fn start(&self) -> Result<(), StorageError> {
        self.started
            .get_or_try_init(|| async {
                let mut start = self.stored_high_water().await?.0;
                if let Some(floor) = &self.floor {
                    start = start.max(high_water_of(self.kv.as_ref(), floor).await?.0);
                }
                let mut state = self.lock();
                state.last = start;
                state.block_end = start;
                self.completed.send_replace(start);
                Ok::<(), StorageError>(())
            })
            .await?;
        Ok(())
    }

    /// The highest value any process may have handed out: the reservation (or the counter, for
    /// a counter stored before reservations existed), with the reservation's stored bytes.
    async fn stored_high_water(&self) -> Result<(u64, Option<Vec<u8>>), StorageError> {
        high_water_of(self.kv.as_ref(), &self.name).await
    }

    fn take_in_block(&self) -> Option<u64> {
        let mut state = self.lock();
        if state.last >= state.block_end {
            return None;
        }
        state.last += 1;
        let value = state.last;
        state.in_flight.insert(value);
        Some(value)
    }

    fn block_exhausted(&self) -> bool {
        let state = self.lock();
        state.last >= state.block_end
    }

    /// Claims the next block past everything stored, with a synced conditional write.
    async fn claim_block(&self) -> Result<(), StorageError> {
        let key = crate::keys::counter_reservation(&self.name);
        for _ in 0..CLAIM_RETRIES {
            let (stored, raw) = self.stored_high_water().await?;
            let base = stored.max(self.lock().last);
            let end = base
                .checked_add(COUNTER_RESERVATION_BLOCK)
                .ok_or(StorageError::LimitExceeded { what: "counter", limit: usize::MAX })?;
            let mut batch = WriteBatch::new();
            batch.expect(Table::Counters, key.clone(), raw);
            batch.put(Table::Counters, key.clone(), end.to_be_bytes().to_vec());
            match self.kv.write_synced(batch).await {
                Ok(()) => {
                    let mut state = self.lock();
                    // Values between our last and `base` belong to whoever claimed them.
                    state.last = state.last.max(base);
                    state.block_end = end;
                    let mark = state.completed();
                    self.completed.send_if_modified(|completed| advance(completed, mark));
                    return Ok(());
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::Conflict)
    }

    fn release(&self, value: u64) {
        let mut state = self.lock();
        state.in_flight.remove(&value);
        let mark = state.completed();
        self.completed.send_if_modified(|completed| advance(completed, mark));
    }
}

/// The highest value the named stream may have handed out: its reservation (or its counter,
/// for a counter stored before reservations existed), with the reservation's stored bytes.
async fn high_water_of(kv: &dyn KvStore, name: &str) -> Result<(u64, Option<Vec<u8>>), StorageError> {
    let reservation = kv.get(Table::Counters, &crate::keys::counter_reservation(name)).await?;
    let counter = kv.get(Table::Counters, &crate::keys::counter(name)).await?;
    let high = counter_value(name, reservation.as_deref())?.max(counter_value(name, counter.as_deref())?);
    Ok((high, reservation))
}

/// Moves the mark forward only: readers must never see it go back.
fn advance(completed: &mut u64, mark: u64) -> bool {
    if mark > *completed {
        *completed = mark;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn memory() -> Arc<dyn KvStore> {
        Arc::new(MemoryStore::new())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_mark_stops_before_the_oldest_position_in_flight() {
        let stream = Arc::new(StreamPositions::new(memory(), "stream"));
        assert_eq!(stream.completed().await.unwrap(), 0);
        let first = stream.take().await.unwrap();
        let second = stream.take().await.unwrap();
        let third = stream.take().await.unwrap();
        assert_eq!((first.get(), second.get(), third.get()), (1, 2, 3));
        // The third is published and the second abandoned before the first is done.
        let publishing_third = tokio::spawn(third.published());
        drop(second);
        assert_eq!(stream.completed().await.unwrap(), 0, "the first is still in flight");
        assert!(!publishing_third.is_finished(), "publishing waits until readers can see it");
        first.published().await;
        assert!(stream.completed().await.unwrap() >= 1);
        publishing_third.await.unwrap();
        assert_eq!(stream.completed().await.unwrap(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_writers_get_distinct_positions_and_the_mark_reaches_the_last() {
        let stream = Arc::new(StreamPositions::new(memory(), "stream"));
        let mut tasks = Vec::new();
        for writer in 0..8 {
            let stream = stream.clone();
            tasks.push(tokio::spawn(async move {
                let mut taken = Vec::new();
                for n in 0..300 {
                    let position = stream.take().await.unwrap();
                    taken.push(position.get());
                    if (writer + n) % 5 == 0 {
                        drop(position);
                    } else {
                        position.published().await;
                    }
                }
                taken
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=2_400).collect::<Vec<u64>>(), "one block after another, none twice");
        // Abandoned positions are released behind a write; wait for the last of them.
        let last = stream.take().await.unwrap();
        assert_eq!(last.get(), 2_401);
        last.published().await;
        assert_eq!(stream.completed().await.unwrap(), 2_401);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn two_allocators_on_one_store_never_share_a_position() {
        let kv = memory();
        let block = COUNTER_RESERVATION_BLOCK;
        let first = StreamPositions::new(kv.clone(), "stream");
        let mut seen = BTreeSet::new();
        let taken = first.take().await.unwrap();
        seen.insert(taken.get());
        taken.published().await;
        // A restart (or a second process) starts past everything reserved, and so does the
        // first allocator once its block runs out.
        let second = StreamPositions::new(kv.clone(), "stream");
        assert_eq!(second.completed().await.unwrap(), block, "nothing up to the reservation is new");
        for _ in 0..block + 5 {
            for stream in [&first, &second] {
                let taken = stream.take().await.unwrap();
                assert!(seen.insert(taken.get()), "{} handed out twice", taken.get());
                taken.published().await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_counter_stored_without_a_reservation_is_not_repeated() {
        let kv = memory();
        let mut batch = WriteBatch::new();
        batch.put(Table::Counters, crate::keys::counter("stream"), 41u64.to_be_bytes().to_vec());
        kv.write(batch).await.unwrap();
        let stream = StreamPositions::new(kv.clone(), "stream");
        assert_eq!(stream.completed().await.unwrap(), 41);
        assert_eq!(stream.take().await.unwrap().get(), 42);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stream_split_off_another_starts_above_everything_it_handed_out() {
        let kv = memory();
        let shared = StreamPositions::new(kv.clone(), "stream");
        let taken = shared.take().await.unwrap();
        taken.published().await;
        let receipts = StreamPositions::above(kv.clone(), "stream.receipts", "stream");
        let floor = COUNTER_RESERVATION_BLOCK;
        assert_eq!(receipts.completed().await.unwrap(), floor, "the shared stream's whole reservation lies below");
        assert_eq!(receipts.take().await.unwrap().get(), floor + 1);
    }
}
