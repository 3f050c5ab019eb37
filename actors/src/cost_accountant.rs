//! # CostAccountant
//!
//! Owns the ledger: the totals of spend and tokens per UTC day, tenant,
//! model, priority and route, kept in the ledger store, and the spend the
//! budgets are checked against. Pricing itself is the plain
//! [`crate::pricing`] table the Dispatcher also uses for outcomes.
//!
//! Receives: [`CostMsg`]: every sheet of call records the Dispatchers write
//! (through a watch of the store, in write order, replicas' included), and
//! a flush tick. Sends: revision-checked updates of the daily totals, at
//! most one per key and flush (every `ledger.flush_ms`); `started` records
//! whose writer died are written again as `estimated` and `lapsed` (see
//! [`crate::ledger`] for how each call is counted once).
//!
//! On restart: it reads this month's totals, watches the records from the
//! start again and skips those its totals already include; records written
//! while it was down are counted then. Nothing is lost with its memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::context::EngineContext;
use crate::ledger::{month_of, CallRecord, CallSheet, CallState, DayTotals};
use crate::messages::CostMsg;
use crate::metrics;
use crate::ports::LedgerError;

/// The CostAccountant actor.
pub struct CostAccountant;

/// Final records waiting to be added to one key's totals, in revision order.
type Pending = Vec<(CallRecord, u64)>;

/// The CostAccountant's state.
pub struct AccountantState {
    ctx: Arc<EngineContext>,
    /// True once this month's totals are read.
    loaded: bool,
    /// The highest record revision seen (a watch opened again replays older ones).
    seen_through: u64,
    /// Requests in flight, by call id.
    started: HashMap<String, CallRecord>,
    /// Requests in flight whose lapsed record this accountant has written
    /// and not seen back yet.
    lapsing: HashSet<String>,
    /// Calls counted at their estimate because their writer stopped: a
    /// final record of theirs seen later is not counted again.
    lapsed: HashSet<String>,
    /// Final records not yet in the totals, by day key.
    pending: BTreeMap<String, Pending>,
    /// Totals as last read or written, by key, with their revision.
    days: HashMap<String, (DayTotals, u64)>,
    follower: JoinHandle<()>,
    ticker: JoinHandle<()>,
}

impl Drop for AccountantState {
    fn drop(&mut self) {
        self.follower.abort();
        self.ticker.abort();
    }
}

impl Actor for CostAccountant {
    type Msg = CostMsg;
    type State = AccountantState;
    type Arguments = Arc<EngineContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<CostMsg>,
        ctx: Arc<EngineContext>,
    ) -> Result<AccountantState, ActorProcessingErr> {
        let follower = tokio::spawn(follow(ctx.clone(), myself.clone()));
        let every = ctx.settings.ledger.flush_every;
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if myself.cast(CostMsg::Flush).is_err() {
                    return;
                }
            }
        });
        Ok(AccountantState {
            ctx,
            loaded: false,
            seen_through: 0,
            started: HashMap::new(),
            lapsing: HashSet::new(),
            lapsed: HashSet::new(),
            pending: BTreeMap::new(),
            days: HashMap::new(),
            follower,
            ticker,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<CostMsg>,
        msg: CostMsg,
        state: &mut AccountantState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CostMsg::Loaded(days) => state.load(days),
            CostMsg::Sheet(sheet) => state.seen(sheet),
            CostMsg::Flush => state.flush().await,
            CostMsg::FlushNow(reply) => {
                state.flush().await;
                let _ = reply.send(());
            }
            CostMsg::InjectFault => panic!("fault injected into the cost accountant"),
        }
        Ok(())
    }
}

/// Reads this month's totals, then follows the call sheets (opening the
/// watch again whenever it ends), casting both to the accountant in order.
async fn follow(ctx: Arc<EngineContext>, myself: ActorRef<CostMsg>) {
    let mut wait = Duration::from_millis(100);
    let max_wait = Duration::from_secs(5);
    let days = loop {
        match ctx.ports.ledger.days(&month_of(ctx.clock.now())).await {
            Ok(days) => break days,
            Err(e) => tracing::warn!(error = %e, "reading this month's ledger; trying again"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(max_wait);
    };
    if myself.cast(CostMsg::Loaded(days)).is_err() {
        return;
    }
    loop {
        match ctx.ports.ledger.watch_sheets().await {
            Ok(mut sheets) => {
                wait = Duration::from_millis(100);
                while let Some(sheet) = sheets.next().await {
                    match sheet {
                        Ok(sheet) => {
                            if myself.cast(CostMsg::Sheet(sheet)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the watch of call sheets ended; opening it again");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching call sheets; trying again"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(max_wait);
    }
}

impl AccountantState {
    fn load(&mut self, days: Vec<(String, DayTotals, u64)>) {
        self.ctx.spend.reset(
            days.iter()
                .map(|(_, d, _)| (d.tenant.clone(), d.day.clone(), d.spend())),
        );
        self.days = days.into_iter().map(|(k, d, r)| (k, (d, r))).collect();
        self.loaded = true;
    }

    fn seen(&mut self, sheet: CallSheet) {
        if sheet.revision <= self.seen_through {
            return; // a watch opened again replays what was seen
        }
        self.seen_through = sheet.revision;
        for record in sheet.records {
            self.seen_record(record, sheet.revision);
        }
    }

    fn seen_record(&mut self, record: CallRecord, revision: u64) {
        match record.state {
            CallState::Started => {
                self.started.insert(record.call_id.clone(), record);
                return;
            }
            CallState::Refused => {
                self.started.remove(&record.call_id);
                return;
            }
            CallState::Finished | CallState::Estimated | CallState::Shared => {}
        }
        let was_started = self.started.remove(&record.call_id).is_some();
        if record.lapsed {
            self.lapsing.remove(&record.call_id);
            if !was_started {
                return; // its final record came first, or another lapse did
            }
            self.lapsed.insert(record.call_id.clone());
        } else if self.lapsed.contains(&record.call_id) {
            return; // counted at its estimate already
        }
        let key = record.day_key();
        if self
            .days
            .get(&key)
            .is_some_and(|(d, _)| d.includes(revision))
        {
            return;
        }
        self.ctx
            .spend
            .add(&record.tenant, &record.day, record.cost_picousd);
        self.pending
            .entry(key)
            .or_default()
            .push((record, revision));
    }

    async fn flush(&mut self) {
        if !self.loaded {
            return;
        }
        self.estimate_stale().await;
        let keys: Vec<String> = self.pending.keys().cloned().collect();
        for key in keys {
            let Some(records) = self.pending.remove(&key) else {
                continue;
            };
            if let Err(e) = self.write(&key, &records).await {
                tracing::warn!(key = %key, error = %e, records = records.len(), "ledger totals not written; kept for the next flush");
                self.pending.insert(key, records);
            }
        }
        self.forget_old_days();
        self.report_budgets();
    }

    /// Adds `records` to the totals at `key`: read (or cached), add, write
    /// if the revision is unchanged; on a conflict read again and redo.
    async fn write(&mut self, key: &str, records: &Pending) -> Result<(), LedgerError> {
        let ledger = self.ctx.ports.ledger.clone();
        for _ in 0..16 {
            let (mut totals, revision) = match self.days.get(key) {
                Some((d, r)) => (d.clone(), Some(*r)),
                None => match ledger.read_day(key).await? {
                    Some((d, r)) => (d, Some(r)),
                    None => {
                        let first = &records[0].0;
                        (DayTotals::new(&first.day, &first.tenant), None)
                    }
                },
            };
            let before = totals.applied_through;
            totals.apply(records);
            if totals.applied_through == before {
                return Ok(()); // all counted already (by another accountant)
            }
            match ledger.write_day(key, &totals, revision).await {
                Ok(r) => {
                    self.days.insert(key.to_owned(), (totals, r));
                    return Ok(());
                }
                Err(LedgerError::Conflict(_)) => {
                    self.days.remove(key);
                }
                Err(e) => {
                    self.days.remove(key);
                    return Err(e);
                }
            }
        }
        Err(LedgerError::Conflict(key.to_owned()))
    }

    /// Requests whose record says `started` for longer than the request
    /// timeout will never be answered to anyone: their writer is gone. They
    /// are written again, in one sheet, as `estimated` and `lapsed`, and the
    /// watch brings them back to count (unless a final record of theirs
    /// came first).
    async fn estimate_stale(&mut self) {
        let s = &self.ctx.settings;
        let after = chrono::Duration::from_std(s.request_timeout + s.ledger.flush_every)
            .unwrap_or(chrono::Duration::MAX);
        let now = self.ctx.clock.now();
        let stale: Vec<CallRecord> = self
            .started
            .values()
            .filter(|r| now - r.started_at > after && !self.lapsing.contains(&r.call_id))
            .take(crate::call_sheets::MAX_SHEET)
            .map(|r| {
                let mut r = r.clone();
                r.lapse();
                r
            })
            .collect();
        if stale.is_empty() {
            return;
        }
        match self.ctx.ports.ledger.write_sheet(&stale).await {
            Ok(_) => {
                for r in stale {
                    tracing::info!(call_id = %r.call_id, estimate_usd = crate::pricing::usd(r.cost_picousd), "a request in flight when its writer stopped is counted at its estimate");
                    self.lapsing.insert(r.call_id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, calls = stale.len(), "could not mark stale requests as estimated; trying at the next flush");
            }
        }
    }

    /// Keeps only this month's totals in memory.
    fn forget_old_days(&mut self) {
        let month = month_of(self.ctx.clock.now());
        self.days.retain(|_, (d, _)| d.day.starts_with(&month));
    }

    fn report_budgets(&self) {
        let budgets = &self.ctx.settings.budgets;
        if budgets.is_unlimited() {
            return;
        }
        let now = self.ctx.clock.now();
        let mut tenants = self.ctx.spend.tenants();
        tenants.extend(budgets.tenants.keys().cloned());
        tenants.push(metrics::DEFAULT_TENANT.to_owned());
        tenants.sort();
        tenants.dedup();
        for tenant in tenants {
            for (period, ratio) in budgets.used_ratios(&tenant, &self.ctx.spend, now) {
                metrics::budget_used(&tenant, period.as_str(), ratio);
            }
        }
    }
}
