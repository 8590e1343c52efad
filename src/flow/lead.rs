//! The rebuild a flight's leader runs, in a task of its own so that a
//! client that hangs up does not take its waiters' answer with it.
//!
//! 1. **Acquire**: take the key's lease (one rebuild in the whole fleet).
//!    If another process holds it, wait for that process's fill (woken by
//!    the store's fill notifications, polling as a fallback, taking the
//!    lease over as soon as it is gone) up to `wait_timeout`; then take a
//!    permit and rebuild. A relief leader (its flight's wait ran out) takes
//!    a permit at once.
//! 2. **Re-check** the store once the lease is held: another process may
//!    have filled the key meanwhile.
//! 3. **Rebuild**: call the inner service, extending the lease while it
//!    runs, up to `rebuild_timeout`; stream the body to the leader's own
//!    client while recording it.
//! 4. **Settle**: store the entry fenced by the lease or permit, then land
//!    the flight: the entry, `Uncacheable`, `Failed`, or nothing (a fill
//!    fenced out by an invalidation: the waiters look again).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower_service::Service;

use crate::body::{FenceBody, Piece};
use crate::entry::{flags, Entry};
use crate::flow::origin::{self, Head, Teed};
use crate::flow::settle::{self, Fence, Filled};
use crate::flow::{Inner, Keyed, SendBody};
use crate::grpc;
use crate::key::{self, CacheKey};
use crate::policy;
use crate::range;
use crate::respond::{self, vary_matches};
use crate::shared::{Landing, Shared};
use crate::singleflight::Lead;
use crate::status::{CacheStatus, Fwd};
use crate::store_client::Found;

/// A rebuild to run: the flight it leads, the readied inner service and the
/// request it sends there.
pub(crate) struct Job<S, B> {
    pub(crate) keyed: Keyed,
    pub(crate) lead: Lead<Landing>,
    pub(crate) svc: S,
    pub(crate) req: Request<B>,
    /// The entry the lookup found, if stale: revalidated, and served when
    /// the origin fails (stale-if-error) or a remote rebuild takes too long.
    pub(crate) stale: Option<Arc<Entry>>,
    pub(crate) fwd: Fwd,
    /// Set when the lookup failed: the rebuild stores nothing.
    pub(crate) store_failure: Option<&'static str>,
    /// The rebuild relieves a flight whose wait ran out: it takes a permit,
    /// not the lease.
    pub(crate) relief: bool,
}

/// What the leader's own client gets.
pub(crate) type LeaderResult<RB, E> = Result<Response<FenceBody<RB>>, E>;

/// A running rebuild, as its leader's client sees it.
pub(crate) struct Leading<RB: Body, E> {
    pub(crate) reply: oneshot::Receiver<LeaderResult<RB, E>>,
    pub(crate) task: JoinHandle<()>,
}

/// A started rebuild, or the job back.
pub(crate) type Spawned<S, B, RB> =
    Result<Leading<RB, <S as Service<Request<B>>>::Error>, Box<Job<S, B>>>;

/// Starts the rebuild in a task of its own; `Err` gives the job back when
/// there is no Tokio runtime to run it on.
pub(crate) fn spawn<S, B, RB>(job: Job<S, B>) -> Spawned<S, B, RB>
where
    S: Inner<B, RB>,
    B: Send + 'static,
    RB: SendBody,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Err(Box::new(job));
    };
    let (tx, reply) = oneshot::channel();
    // The rebuild carries the request's span: one trace for its client's
    // request and the origin call it made.
    let task = runtime.spawn(run(job, tx).instrument(tracing::Span::current()));
    Ok(Leading { reply, task })
}

async fn run<S, B, RB>(job: Job<S, B>, reply: oneshot::Sender<LeaderResult<RB, S::Error>>)
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
{
    let Job {
        keyed,
        lead,
        mut svc,
        mut req,
        stale,
        fwd,
        store_failure,
        relief,
    } = job;
    let shared = keyed.shared.clone();
    let key = &keyed.key;
    let prepared = origin::prepare(&shared, &mut req, stale.as_deref());
    let headers = &prepared.request_headers;
    // Answers the leader's client (once: later answers are dropped).
    let mut reply = Some(reply);
    let mut respond = |result: LeaderResult<RB, S::Error>| {
        if let Some(reply) = reply.take() {
            let _ = reply.send(result);
        }
    };

    // 1. Acquire.
    let fence = if store_failure.is_some() {
        Fence::None
    } else if relief {
        settle::take_permit(&shared, key, &prepared.lease_sets).await
    } else {
        match settle::take_lease(&shared, key, &prepared.lease_sets).await {
            Ok(Some(fence)) => fence,
            Ok(None) => {
                match await_remote_fill(&keyed, &lead, &prepared.lease_sets, headers).await {
                    Remote::Filled(entry, op) => {
                        let entry: Arc<Entry> = Arc::from(entry);
                        lead.land_by(Landing::Response(entry.clone()), op);
                        let status = CacheStatus::collapsed(fwd, entry.status.as_u16());
                        let now_ms = shared.clock.now_ms();
                        respond(Ok(respond::shared_entry_response(
                            entry,
                            now_ms,
                            false,
                            status,
                            true,
                            Some(headers),
                        )));
                        return;
                    }
                    Remote::Leased(fence) => fence,
                    Remote::TimedOut => {
                        let now_ms = shared.clock.now_ms();
                        let usable = stale
                            .as_ref()
                            .filter(|s| s.in_grace(now_ms) || s.usable_on_error(now_ms));
                        if let Some(stale) = usable {
                            lead.land(Landing::Response(stale.clone()));
                            let status = CacheStatus::default();
                            respond(Ok(respond::stale_response(
                                stale,
                                now_ms,
                                false,
                                status,
                                "wait-timeout",
                                Some(headers),
                            )));
                            return;
                        }
                        // The other process's rebuild is late or dead: rebuild
                        // here, fenced by a permit, so its result is stored.
                        settle::take_permit(&shared, key, &prepared.lease_sets).await
                    }
                }
            }
            Err(_) => Fence::None,
        }
    };

    // 2. Re-check: another process may have filled the key between our
    // lookup and our lease -- unless the request's own directives
    // (`no-cache`, `max-age`) ruled stored responses out.
    if matches!(fence, Fence::Lease { .. }) && fwd != Fwd::Request {
        let op = lead.seal();
        if let Some(entry) = read_usable(&keyed, headers).await {
            settle::release(&shared, key, &fence).await;
            let entry = Arc::new(entry);
            lead.land_by(Landing::Response(entry.clone()), op);
            let now_ms = shared.clock.now_ms();
            let status = CacheStatus::hit(entry.ttl_ms(now_ms).div_euclid(1000));
            respond(Ok(respond::shared_entry_response(
                entry,
                now_ms,
                false,
                status,
                true,
                Some(headers),
            )));
            return;
        }
    }

    // 3. Rebuild. The local waiters' patience is timed from here.
    lead.restart_clock();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + shared.rebuild_timeout;
    let stale_on_error = stale
        .as_ref()
        .is_some_and(|s| s.usable_on_error(shared.clock.now_ms()));
    let answer = keep_lease(&shared, key, &fence, deadline, svc.call(req)).await;
    let now_ms = shared.clock.now_ms();
    let head = origin::classify(
        &keyed,
        answer,
        stale.as_deref(),
        stale_on_error,
        now_ms,
        started,
    );

    // 4. Settle.
    match head {
        Head::Failed(err) => {
            settle::release(&shared, key, &fence).await;
            match stale.filter(|_| stale_on_error) {
                Some(stale) => {
                    lead.land(Landing::Response(stale.clone()));
                    let status = CacheStatus::forward(Fwd::Stale);
                    respond(Ok(respond::stale_response(
                        &stale,
                        now_ms,
                        false,
                        status,
                        "stale-if-error",
                        Some(headers),
                    )));
                }
                None => {
                    lead.land(Landing::Failed);
                    respond(Err(err));
                }
            }
        }
        Head::OriginError { detail } => {
            settle::release(&shared, key, &fence).await;
            if let Some(stale) = stale {
                lead.land(Landing::Response(stale.clone()));
                let status = CacheStatus::forward(Fwd::Stale);
                respond(Ok(respond::stale_response(
                    &stale,
                    now_ms,
                    false,
                    status,
                    detail,
                    Some(headers),
                )));
            }
        }
        Head::NotModified {
            entry,
            storable,
            tags,
        } => {
            let op = lead.seal();
            let filled =
                settle::fill_or_release(&keyed, &prepared.path, &entry, &fence, storable, &tags)
                    .await;
            let entry = Arc::new(entry);
            let status = CacheStatus {
                fwd_status: Some(304),
                stored: filled == Filled::Stored,
                ..CacheStatus::forward(fwd)
            };
            settle_flight(lead, filled, entry.clone(), op);
            respond(Ok(respond::shared_entry_response(
                entry,
                now_ms,
                false,
                status,
                false,
                Some(headers),
            )));
        }
        Head::Unshared {
            mut response,
            reason,
            remember,
        } => {
            settle::release(&shared, key, &fence).await;
            if remember {
                // Hit-for-miss: the next requests for this key go straight
                // to the origin instead of queueing behind a leader whose
                // answer they could not have.
                shared.hit_for_miss.insert(key.as_str().to_owned(), ());
                lead.land(Landing::Uncacheable);
            } else {
                drop(lead);
            }
            let status = CacheStatus {
                fwd_status: Some(response.status().as_u16()),
                detail: Some(store_failure.unwrap_or(reason)),
                ..CacheStatus::forward(fwd)
            };
            status.stamp(&mut response);
            let (parts, body) = response.into_parts();
            respond(Ok(Response::from_parts(
                parts,
                FenceBody::passthrough(body),
            )));
        }
        Head::Share {
            parts,
            body,
            freshness,
            tags,
        } => {
            let max = shared.max_body_size;
            let hint = body.size_hint();
            let mut status = CacheStatus {
                fwd_status: Some(parts.status.as_u16()),
                detail: store_failure.or(freshness.is_none().then_some("status")),
                ..CacheStatus::forward(fwd)
            };
            let settle = |recorded| async {
                let now_ms = shared.clock.now_ms();
                let storable = freshness.is_some();
                let entry = origin::entry_of(&parts, recorded, freshness, headers, now_ms, started);
                let filled = settle::fill_or_release(
                    &keyed,
                    &prepared.path,
                    &entry,
                    &fence,
                    storable,
                    &tags,
                )
                .await;
                (Arc::new(entry), filled)
            };
            let (body, recorder, read, stop) = match origin::read_ready(body, max) {
                origin::Early::Complete(recorded) => {
                    // All there: settle first, then answer with what was
                    // done.
                    let op = lead.seal();
                    let (entry, filled) = settle(recorded).await;
                    status.stored = filled == Filled::Stored;
                    settle_flight(lead, filled, entry.clone(), op);
                    // Forwarded from the origin: keep the `Age` it sent
                    // (the entry holds it as its age; none when it sent none).
                    let with_age = entry.age_secs(now_ms) > 0;
                    respond(Ok(respond::shared_entry_response(
                        entry,
                        now_ms,
                        false,
                        status,
                        with_age,
                        Some(headers),
                    )));
                    return;
                }
                origin::Early::Streaming {
                    body,
                    recorder,
                    read,
                    stop,
                } => (body, recorder, read, stop),
            };
            // Still coming: stream it to the client as it comes, and say
            // `stored` when the whole body should fit.
            let fits = hint.upper().is_some_and(|upper| upper <= max as u64);
            status.stored = freshness.is_some() && fence.allows_store() && fits && stop.is_none();
            let (tx, rx) = mpsc::unbounded_channel();
            for piece in read {
                let _ = tx.send(piece);
            }
            let mut head = parts.clone();
            status.clone().stamp_parts(&mut head);
            let streamed = Response::from_parts(head, FenceBody::streamed(rx, hint));
            // A `Range` request waits for the whole body (within the cap
            // and the rebuild timeout) so that its ranges are cut from the
            // entry; if the body is not recorded whole, it gets the full
            // response (RFC 9110 §14.2 lets a server ignore `Range`).
            let ranged = range::asks_range(headers) && parts.status == StatusCode::OK;
            let mut held = if ranged && stop.is_none() {
                Some(streamed)
            } else {
                respond(Ok(streamed));
                None
            };
            let teed = match stop {
                Some("too-large") => {
                    let _ = tx.send(Piece::Rest(body));
                    Teed::Incomplete("too-large")
                }
                Some(why) => Teed::Incomplete(why),
                None => origin::tee(body, recorder, &tx, deadline).await,
            };
            match teed {
                Teed::Complete(recorded) => {
                    let op = lead.seal();
                    let (entry, filled) = settle(recorded).await;
                    settle_flight(lead, filled, entry.clone(), op);
                    if held.take().is_some() {
                        status.stored = filled == Filled::Stored;
                        let now_ms = shared.clock.now_ms();
                        let with_age = entry.age_secs(now_ms) > 0;
                        respond(Ok(respond::shared_entry_response(
                            entry,
                            now_ms,
                            false,
                            status,
                            with_age,
                            Some(headers),
                        )));
                    }
                    let _ = tx.send(Piece::End);
                }
                Teed::Incomplete(why) => {
                    if let Some(streamed) = held.take() {
                        respond(Ok(streamed));
                    }
                    settle::release(&shared, key, &fence).await;
                    if why == "too-large" {
                        shared.hit_for_miss.insert(key.as_str().to_owned(), ());
                        lead.land(Landing::Uncacheable);
                    } else {
                        drop(lead);
                    }
                }
            }
        }
    }
}

/// Lands the flight with the rebuilt `entry`, unless its fill was fenced
/// out: then the entry was read before an invalidation, and is not for
/// requests that may have come after the write (they look again). Nor is
/// it for requests that joined after the fill (operation `op`) started: a
/// write of another process may have invalidated it since.
fn settle_flight(lead: Lead<Landing>, filled: Filled, entry: Arc<Entry>, op: u64) {
    // A failed gRPC call (or a stream) is its caller's alone: the waiters
    // call again, one at a time.
    if filled == Filled::FencedOut || !grpc::storable(&entry) {
        drop(lead);
    } else {
        lead.land_by(Landing::Response(entry), op);
    }
}

/// Runs `work`, extending the lease or permit every third of its TTL
/// while it runs, until `deadline` (the rebuild timeout) or until the lease
/// is lost; then lets it expire.
pub(crate) async fn keep_lease<F: Future>(
    shared: &Shared,
    key: &CacheKey,
    fence: &Fence,
    deadline: tokio::time::Instant,
    work: F,
) -> F::Output {
    let Some((lease, token)) = fence.held(key.as_str()) else {
        return work.await;
    };
    let mut work = pin!(work);
    let period = (shared.lease_ttl / 3).max(Duration::from_millis(10));
    let mut extending = true;
    loop {
        tokio::select! {
            out = &mut work => return out,
            () = tokio::time::sleep(period), if extending => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::debug!(key = key.as_str(), "tower-fence: rebuild timeout; lease left to expire");
                    extending = false;
                    continue;
                }
                if let Ok(false) = shared.store.extend_lease(lease, token, shared.lease_ttl).await {
                    tracing::debug!(key = key.as_str(), "tower-fence: rebuild lease lost");
                    extending = false;
                }
            }
        }
    }
}

/// What waiting for another process's rebuild came to.
enum Remote {
    /// Read by operation `op` of the flight (see [`Lead::seal`]).
    Filled(Box<Entry>, u64),
    /// The other process let go of the lease (it finished without storing,
    /// or died and the lease expired), and this rebuild took it.
    Leased(Fence),
    TimedOut,
}

async fn await_remote_fill(
    keyed: &Keyed,
    lead: &Lead<Landing>,
    lease_sets: &[String],
    request_headers: &HeaderMap,
) -> Remote {
    let (shared, key) = (&keyed.shared, &keyed.key);
    shared.bump(|c| &c.remote_waits);
    lead.awaiting_remote();
    // Subscribe before reading, so that a fill between the read and the
    // wait still wakes us.
    let mut subscription = shared.store.subscribe_fill(key.as_str());
    let deadline = tokio::time::Instant::now() + shared.wait_timeout;
    loop {
        let op = lead.seal();
        if let Some(entry) = read_usable(keyed, request_headers).await {
            return Remote::Filled(Box::new(entry), op);
        }
        if let Ok(Some(fence)) = settle::take_lease(shared, key, lease_sets).await {
            return Remote::Leased(fence);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            shared.bump(|c| &c.wait_timeouts);
            return Remote::TimedOut;
        }
        let nap = shared.fill_poll_interval.min(deadline - now);
        match subscription.as_mut() {
            Some(subscription) => {
                let _ = tokio::time::timeout(nap, subscription.filled()).await;
            }
            None => tokio::time::sleep(nap).await,
        }
    }
}

/// Reads the key's entry if it is there, decodes, is fresh, matches the
/// request's `Vary` values and may answer the request (its credentials).
async fn read_usable(keyed: &Keyed, request_headers: &HeaderMap) -> Option<Entry> {
    let (shared, key) = (&keyed.shared, &keyed.key);
    let entry = match shared.store.read(key.as_str()).await {
        Found::Entry(entry) => entry,
        // The fill was of a varying response: read this request's variant.
        Found::Vary(names) => {
            let variant = key::variant(key, &names, request_headers);
            match shared.store.read(variant.as_str()).await {
                Found::Entry(entry) => entry,
                _ => return None,
            }
        }
        Found::Nothing | Found::Failed(_) => return None,
    };
    let usable = entry.is_fresh(shared.clock.now_ms())
        && !entry.has(flags::REVALIDATE)
        && vary_matches(&entry, request_headers)
        && policy::may_answer(&entry, &keyed.facts, keyed.overrides.keyed_by_credential);
    usable.then_some(entry)
}
