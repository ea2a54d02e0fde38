//! Account streams: one request, one reply (`TopupRequest`, `UsageRequest`, `PriceRequest`,
//! `DeviceLeave`, `CertRenew`). Every request acts on the calling device's own account, and is
//! checked against the device's current state first: a device revoked since its connection
//! was made is refused here, whatever the revocation watcher has done yet.

use synesis_billing::ledger::LedgerError;
use synesis_proto::message::{
    AdapterInfo, AdapterRemoved, AdaptersReply, CertRenew, CertRenewed, DeviceLeave, DeviceLeft,
    InviteCreated, Member, MembersReply, ModelPrice, PriceReply, PriceRequest, Role, ServedModel,
    Tier, TopupReply, TopupRequest, UsageRequest,
};
use synesis_proto::{Blob, ErrorCode, FrameLimits, Message, RequestId, UnixMillis};

use crate::endpoint::Peer;
use crate::shared::now;
use crate::storage::adapters::Removed;
use crate::storage::{IssuedCert, Renewal};
use crate::streams::{Stream, error_msg};

pub(crate) async fn serve(peer: &Peer, request: Message, mut stream: Stream) {
    let request_id = request_id_of(&request);
    let reply = match request {
        Message::TopupRequest(r) => topup(peer, r).await,
        Message::UsageRequest(r) => usage(peer, r).await,
        Message::PriceRequest(r) => price(peer, r).await,
        Message::DeviceLeave(r) => leave(peer, r).await,
        Message::CertRenew(r) => renew(peer, r).await,
        Message::AdaptersRequest(r) => adapters(peer, r.request_id).await,
        Message::MembersRequest(r) => members(peer, r.request_id).await,
        Message::InviteCreate(r) => invite(peer, r).await,
        Message::MemberRemove(r) => remove_member(peer, r.request_id, r.name).await,
        Message::HandoverOffer(r) => offer_handover(peer, r.request_id, r.to).await,
        Message::HandoverAccept(r) => accept_handover(peer, r.request_id).await,
        Message::InvitesRequest(r) => pending_invites(peer, r.request_id).await,
        Message::InviteRevoke(r) => revoke_invites(peer, r.request_id, r.invitee).await,
        Message::AdapterRemove(r) => remove_adapter(peer, r.request_id, r.name).await,
        other => error_msg(
            ErrorCode::UNEXPECTED_MESSAGE,
            format!("{} is not served yet", other.message_type().name()),
            request_id,
        ),
    };
    stream.send_last(&reply).await;
}

fn request_id_of(m: &Message) -> Option<RequestId> {
    match m {
        Message::TopupRequest(r) => Some(r.request_id),
        Message::UsageRequest(r) => Some(r.request_id),
        Message::PriceRequest(r) => Some(r.request_id),
        Message::DeviceLeave(r) => Some(r.request_id),
        Message::CertRenew(r) => Some(r.request_id),
        Message::AdaptersRequest(r) => Some(r.request_id),
        Message::MembersRequest(r) => Some(r.request_id),
        Message::InviteCreate(r) => Some(r.request_id),
        Message::MemberRemove(r) => Some(r.request_id),
        Message::HandoverOffer(r) => Some(r.request_id),
        Message::HandoverAccept(r) => Some(r.request_id),
        Message::InvitesRequest(r) => Some(r.request_id),
        Message::InviteRevoke(r) => Some(r.request_id),
        Message::AdapterRemove(r) => Some(r.request_id),
        _ => None,
    }
}

/// The device's current state, read now: revoked means refused (and every connection of it
/// closed).
pub(crate) async fn still_enrolled(peer: &Peer) -> Result<crate::storage::Device, Message> {
    let checked = enrolled_now(peer).await;
    if let Err(refusal) = &checked {
        close_if_revoked(peer, refusal);
    }
    checked
}

/// The device's current state, read now: revoked means refused. The caller sends the refusal
/// and then [`close_if_revoked`], so that the `DEVICE_REVOKED` reply is not overtaken by the
/// close (PROTOCOL.md §1 *Revocation*).
pub(crate) async fn enrolled_now(peer: &Peer) -> Result<crate::storage::Device, Message> {
    let id = peer.device.id;
    match peer.shared.storage.identify(move |db| db.device(id)).await {
        Ok(Some(d)) if !d.revoked => Ok(d),
        Ok(_) => Err(error_msg(
            ErrorCode::DEVICE_REVOKED,
            "this device was revoked",
            None,
        )),
        Err(e) => {
            tracing::error!(error = %e, "device lookup failed");
            Err(error_msg(ErrorCode::UNAVAILABLE, "try again", None))
        }
    }
}

/// After a `DEVICE_REVOKED` refusal: every connection of the device is closed with the code.
pub(crate) fn close_if_revoked(peer: &Peer, refusal: &Message) {
    if matches!(refusal, Message::ErrorMsg(e) if e.code == ErrorCode::DEVICE_REVOKED) {
        peer.shared.registry.close_device(
            peer.device.id,
            ErrorCode::DEVICE_REVOKED,
            b"this device was revoked",
        );
    }
}

fn internal(e: impl std::fmt::Display, request_id: RequestId) -> Message {
    tracing::error!(error = %e, %request_id, "account request failed");
    error_msg(ErrorCode::INTERNAL, "internal error", Some(request_id))
}

/// `synesis cloud topup --voucher`: a voucher's amount becomes credit, once, in one account.
async fn topup(peer: &Peer, r: TopupRequest) -> Message {
    let account = peer.device.account_id;
    let at = now();
    let (request_id, voucher) = (r.request_id, r.voucher);
    let result = peer
        .shared
        .ledger
        .run(move |store| {
            let Some(amount) = store.redeem_voucher(&voucher, account, request_id, at)? else {
                return Ok(None);
            };
            synesis_billing::ledger::top_up(store, account, request_id, amount, at)?;
            let balance = synesis_billing::ledger::balance(store, account, at)?;
            Ok(Some((amount, balance.balance)))
        })
        .await;
    match result {
        Ok(Some((credited, balance))) => TopupReply {
            request_id,
            credited,
            balance,
        }
        .into(),
        Ok(None) => error_msg(
            ErrorCode::VOUCHER_INVALID,
            "unknown voucher, or it was already redeemed",
            Some(request_id),
        ),
        Err(LedgerError::IdempotencyConflict) => error_msg(
            ErrorCode::IDEMPOTENCY_CONFLICT,
            "this request id was used for something else",
            Some(request_id),
        ),
        Err(e) => internal(e, request_id),
    }
}

/// `synesis cloud usage`: balance, holds, quota, charges. A page is as many charges as fit
/// the largest frame the device takes (up to `USAGE_CHARGES_MAX`): one that announced a lower
/// maximum gets smaller pages, each read from one snapshot, each with its `next`.
///
/// The owner's devices list every member's charges; any other member's devices only their
/// own member's, so that nobody learns another member's request ids (PROTOCOL.md §2, *Usage*).
async fn usage(peer: &Peer, r: UsageRequest) -> Message {
    let (account, device) = (peer.device.account_id, peer.device.id);
    let (at, request_id, rules) = (now(), r.request_id, peer.shared.billing.rules);
    let fits = peer.frame_limits().max_payload_bytes() as usize;
    let mut page = synesis_proto::message::USAGE_CHARGES_MAX;
    loop {
        let request = r.clone();
        let result = peer
            .shared
            .storage
            .read(move |db| {
                let acct = db.account_by_id(account)?;
                // The role as it is now (a handover changes it), read with the listing.
                let role = db.device(device)?.map(|d| d.role);
                let member = match role {
                    Some(Role::Owner) => None,
                    _ => Some(
                        db.unit()
                            .asker_of_device(device)?
                            .ok_or(crate::storage::StorageError::NoSuchDevice(device))?,
                    ),
                };
                Ok(db.member_usage(&acct, member.as_ref(), &request, at, &rules, page))
            })
            .await;
        let reply: Message = match result {
            Ok(Ok(reply)) => reply.into(),
            Ok(Err(e)) => match e.code() {
                ErrorCode::INTERNAL => return internal(e, request_id),
                code => return error_msg(code, e.to_string(), Some(request_id)),
            },
            Err(e) => return internal(e, request_id),
        };
        let size = synesis_proto::encode_frame_vec(&reply, FrameLimits::default())
            .map_or(usize::MAX, |frame| {
                frame.len() - synesis_proto::frame::FRAME_HEADER_BYTES
            });
        if size <= fits || page == 1 {
            return reply;
        }
        // Charges are of about one size: scale the page to what fits, with room to spare.
        page = (page * fits / size * 9 / 10).clamp(1, page - 1);
    }
}

/// `synesis cloud price` and `synesis cloud models`: the account's tier, the price table, the
/// models served to the tier and the default among them.
async fn price(peer: &Peer, r: PriceRequest) -> Message {
    let account = peer.device.account_id;
    let acct = match peer
        .shared
        .storage
        .read(move |db| db.account_by_id(account))
        .await
    {
        Ok(acct) => acct,
        Err(e) => return internal(e, r.request_id),
    };
    let billing = &peer.shared.billing;
    let markup_bps = match acct.tier {
        Tier::Free => 0,
        Tier::Managed => billing.rules.managed_markup_bps,
        Tier::Byok => billing.rules.byok_fee_bps,
    };
    let prices = billing
        .prices
        .iter()
        .map(|(model, p)| ModelPrice {
            model: model.to_owned(),
            input_per_mtok: p.input_per_mtok,
            output_per_mtok: p.output_per_mtok,
        })
        .collect();
    // A served model always has a price (checked when `cloud.toml` is loaded).
    let (served, default_model) = peer.shared.escalations.served_to(acct.tier);
    let served = served
        .into_iter()
        .filter_map(|(model, context_tokens)| {
            let p = billing.prices.get(&model)?;
            Some(ServedModel {
                input_per_mtok: p.input_per_mtok,
                output_per_mtok: p.output_per_mtok,
                model,
                context_tokens,
            })
        })
        .collect();
    PriceReply {
        request_id: r.request_id,
        tier: acct.tier,
        markup_bps,
        prices,
        served,
        default_model,
    }
    .into()
}

/// `synesis cloud logout`: the device revokes itself; every connection of it is closed.
async fn leave(peer: &Peer, leave: DeviceLeave) -> Message {
    let id = peer.device.id;
    let at = now();
    match peer.shared.storage.write(move |db| db.revoke(id, at)).await {
        Ok(()) => {
            tracing::info!(device = %id, "device left (revoked itself)");
            // The reply goes out on this stream first; the connections close right after.
            let registry_peer = peer.shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(crate::endpoint::REVOKED_CLOSE_AFTER).await;
                registry_peer.registry.close_device(
                    id,
                    ErrorCode::DEVICE_REVOKED,
                    b"this device was revoked",
                );
            });
            DeviceLeft {
                request_id: leave.request_id,
                device_id: id,
            }
            .into()
        }
        Err(e) => internal(e, leave.request_id),
    }
}

/// Renewals one device may have within half a certificate lifetime (a retry after a lost
/// answer reuses its request id and does not count again).
const RENEWALS_PER_HALF_LIFETIME_MAX: usize = 3;

/// A new certificate for the calling device (same id, same key), once its current one is in the
/// second half of its life (or lives more than twice what the cloud now signs: one from before
/// certificates expired).
async fn renew(peer: &Peer, r: CertRenew) -> Message {
    let id = peer.device.id;
    let request_id = r.request_id;
    let refuse = |code, why: &str| error_msg(code, why, Some(request_id));
    let Some(current) = crate::endpoint::peer_cert(&peer.conn) else {
        return refuse(ErrorCode::UNAUTHENTICATED, "no device certificate");
    };
    let same_key = synesis_wire::tls::csr_public_key(&r.csr_der.0)
        .is_some_and(|k| Some(k) == synesis_wire::tls::public_key(&current));
    if !same_key {
        return refuse(
            ErrorCode::INVALID_REQUEST,
            "the signing request is not for this device's key",
        );
    }
    // What a certificate signed now lives (its backdating included, as in the current one's).
    let validity = peer.shared.cert_validity();
    let lifetime = validity.1.0.saturating_sub(validity.0.0);
    let at = now();
    if let Some((from, until)) = synesis_wire::tls::validity(&current) {
        let (current_lifetime, left) =
            (until.0.saturating_sub(from.0), until.0.saturating_sub(at.0));
        if left > current_lifetime / 2 && current_lifetime <= lifetime.saturating_mul(2) {
            return refuse(
                ErrorCode::INVALID_REQUEST,
                "this certificate is not due for renewal before half its lifetime",
            );
        }
    }
    let cert = match peer.shared.pki.sign_device(&r.csr_der.0, id, validity) {
        Ok(c) => IssuedCert {
            der: c.to_vec(),
            not_after: validity.1,
        },
        Err(e) => return internal(e, request_id),
    };
    let recent = (
        UnixMillis(at.0.saturating_sub(lifetime / 2)),
        RENEWALS_PER_HALF_LIFETIME_MAX,
    );
    let result = peer
        .shared
        .storage
        .write(move |db| db.renew_cert(id, request_id, at, cert, recent))
        .await;
    match result {
        Ok(Renewal::Issued(cert)) => {
            tracing::info!(device = %id, not_after = cert.not_after.0, "certificate renewed");
            CertRenewed {
                request_id,
                client_cert_der: Blob(cert.der),
                not_after: cert.not_after,
            }
            .into()
        }
        Ok(Renewal::Revoked) => refuse(ErrorCode::DEVICE_REVOKED, "this device was revoked"),
        Ok(Renewal::TooMany) => refuse(
            ErrorCode::LIMIT_EXCEEDED,
            "this device renewed its certificate too often lately",
        ),
        Err(e) => internal(e, request_id),
    }
}

/// `synesis cloud adapters`: the account's adapters, by name.
async fn adapters(peer: &Peer, request_id: RequestId) -> Message {
    let account = peer.device.account_id;
    match peer
        .shared
        .storage
        .read(move |db| db.unit().adapters(account))
        .await
    {
        Ok(rows) => AdaptersReply {
            request_id,
            adapters: rows
                .into_iter()
                .map(|a| AdapterInfo {
                    name: a.name,
                    sha256: a.sha256,
                    size_bytes: a.size_bytes,
                    base_model: a.base_model,
                    uploaded_at: a.uploaded_at,
                    device_id: a.device_id,
                })
                .collect(),
        }
        .into(),
        Err(e) => internal(e, request_id),
    }
}

/// `synesis cloud adapters rm NAME`: the name goes; escalations running on it finish on it.
async fn remove_adapter(peer: &Peer, request_id: RequestId, name: String) -> Message {
    let account = peer.device.account_id;
    let n = name.clone();
    match peer
        .shared
        .storage
        .write(move |db| db.remove_adapter(account, request_id, &n, now()))
        .await
    {
        Ok(Removed::Removed(sha256)) => AdapterRemoved {
            request_id,
            name,
            sha256,
        }
        .into(),
        Ok(Removed::NotFound) => error_msg(
            ErrorCode::NOT_FOUND,
            format!("this account has no adapter named {name:?}"),
            Some(request_id),
        ),
        Ok(Removed::Conflict) => error_msg(
            ErrorCode::IDEMPOTENCY_CONFLICT,
            "this request id removed another adapter",
            Some(request_id),
        ),
        Err(e) => internal(e, request_id),
    }
}

/// `synesis cloud members`: the account's people and their roles, the owner first.
async fn members(peer: &Peer, request_id: RequestId) -> Message {
    let account = peer.device.account_id;
    match peer
        .shared
        .storage
        .read(move |db| db.unit().members(account))
        .await
    {
        Ok(rows) => MembersReply {
            request_id,
            members: rows
                .into_iter()
                .map(|m| Member {
                    name: m.name,
                    role: m.role,
                    joined_at: m.joined_at,
                })
                .collect(),
        }
        .into(),
        Err(e) => internal(e, request_id),
    }
}

/// The shortest and longest an invitation may stay usable.
const INVITE_TTL_MS: std::ops::RangeInclusive<u64> = 60_000..=30 * 24 * 3_600_000;

/// `synesis cloud invite` (the owner's, `roles`): a one-time code that enrolls a device as a
/// new member with `role` — a setup token whose device becomes the invitee's (PROTOCOL.md §2,
/// *Roles*).
async fn invite(peer: &Peer, r: synesis_proto::message::InviteCreate) -> Message {
    use crate::storage::members::{Invitation, Invited};
    let request_id = r.request_id;
    let invitee = crate::storage::printable(&r.invitee);
    if invitee.is_empty() || invitee.len() > 254 {
        return error_msg(
            ErrorCode::INVALID_REQUEST,
            "the invitee is 1 to 254 bytes (an e-mail address, a name)",
            Some(request_id),
        );
    }
    if r.role == synesis_proto::message::Role::Owner {
        return error_msg(
            ErrorCode::INVALID_REQUEST,
            "an account has one owner; invite an editor and hand the account over",
            Some(request_id),
        );
    }
    if !INVITE_TTL_MS.contains(&r.ttl_ms) {
        return error_msg(
            ErrorCode::INVALID_REQUEST,
            "an invitation lasts from a minute to 30 days",
            Some(request_id),
        );
    }
    let account = peer.device.account_id;
    let token_id: [u8; 16] = {
        let mut id = [0u8; 16];
        let digest =
            crate::storage::sha256(format!("synesis-invite\0{account}\0{request_id}").as_bytes());
        id.copy_from_slice(&digest[..16]);
        id
    };
    let secret: [u8; 32] = rand::random();
    let at = now();
    let expires_at = UnixMillis(at.0.saturating_add(i64::try_from(r.ttl_ms).unwrap_or(0)));
    let (role, device, quota_tokens) = (r.role, peer.device.id, r.quota_tokens);
    let secret_sha256 = crate::storage::sha256(&secret);
    let made = peer
        .shared
        .storage
        .write(move |db| {
            let invitation = Invitation {
                account,
                request: request_id,
                token_id,
                secret_sha256,
                invitee: &invitee,
                role,
                quota_tokens,
                created_by: device,
                expires_at,
            };
            db.invite(&invitation, at)
                .map_err(|e| crate::storage::StorageError::Corrupt(e.to_string()))
        })
        .await;
    match made {
        Ok(Invited::Issued) => InviteCreated {
            request_id,
            code: synesis_proto::SetupToken {
                server: String::new(),
                nodes: Vec::new(),
                ca_sha256: synesis_proto::Sha256([0; 32]),
                token_id,
                secret,
            }
            .presented_secret(),
            expires_at,
        }
        .into(),
        Ok(Invited::Used) => error_msg(
            ErrorCode::IDEMPOTENCY_CONFLICT,
            "this request's invitation was accepted already",
            Some(request_id),
        ),
        Ok(Invited::Conflict) => error_msg(
            ErrorCode::IDEMPOTENCY_CONFLICT,
            "this request id made another invitation",
            Some(request_id),
        ),
        Err(e) => internal(e, request_id),
    }
}

/// A refusal about members: the message as people read it, with its code.
fn member_refusal(e: crate::storage::members::MemberError, request_id: RequestId) -> Message {
    use crate::storage::members::MemberError;
    match e {
        MemberError::Storage(e) => internal(e, request_id),
        MemberError::NoSuchMember(_) => {
            error_msg(ErrorCode::NOT_FOUND, e.to_string(), Some(request_id))
        }
        other => error_msg(
            ErrorCode::INVALID_REQUEST,
            other.to_string(),
            Some(request_id),
        ),
    }
}

/// `synesis cloud members rm NAME` (the owner's): the member goes, their devices are revoked
/// (the revocation watcher closes their connections).
async fn remove_member(peer: &Peer, request_id: RequestId, name: String) -> Message {
    let (account, actor) = (peer.device.account_id, peer.device.id.to_string());
    let n = name.clone();
    let removed = peer
        .shared
        .storage
        .write(move |db| Ok(db.remove_member(account, &n, &actor, now())))
        .await;
    // This node's connections of the removed member's devices close at once (other nodes hear
    // of it from the database).
    peer.shared.changed.notify_one();
    match removed {
        Ok(Ok(revoked)) => synesis_proto::message::MemberRemoved {
            request_id,
            name,
            devices_revoked: u32::try_from(revoked).unwrap_or(u32::MAX),
        }
        .into(),
        Ok(Err(e)) => member_refusal(e, request_id),
        Err(e) => internal(e, request_id),
    }
}

/// `synesis cloud handover EMAIL` (the owner's): offers the account to a member for 7 days.
async fn offer_handover(peer: &Peer, request_id: RequestId, to: String) -> Message {
    let (account, actor) = (peer.device.account_id, peer.device.id.to_string());
    let t = to.clone();
    let offered = peer
        .shared
        .storage
        .write(move |db| Ok(db.offer_handover(account, &actor, &t, now())))
        .await;
    match offered {
        Ok(Ok(expires_at)) => synesis_proto::message::HandoverOffered {
            request_id,
            to,
            expires_at,
        }
        .into(),
        Ok(Err(e)) => member_refusal(e, request_id),
        Err(e) => internal(e, request_id),
    }
}

/// `synesis cloud handover accept` (the offered member's device): the roles swap.
async fn accept_handover(peer: &Peer, request_id: RequestId) -> Message {
    use crate::storage::members::HandoverError;
    let (account, device) = (peer.device.account_id, peer.device.id);
    let taken = peer
        .shared
        .storage
        .write(move |db| Ok(db.accept_handover(account, device, now())))
        .await;
    match taken {
        Ok(Ok((account, former_owner))) => synesis_proto::message::HandoverAccepted {
            request_id,
            account,
            former_owner,
        }
        .into(),
        Ok(Err(HandoverError::Storage(e))) | Err(e) => internal(e, request_id),
        Ok(Err(e @ HandoverError::NotOffered)) => {
            error_msg(ErrorCode::NOT_FOUND, e.to_string(), Some(request_id))
        }
        Ok(Err(e @ HandoverError::Lapsed)) => {
            error_msg(ErrorCode::INVALID_REQUEST, e.to_string(), Some(request_id))
        }
    }
}

/// `synesis cloud invites` (the owner's): those not yet accepted.
async fn pending_invites(peer: &Peer, request_id: RequestId) -> Message {
    let account = peer.device.account_id;
    let at = now();
    match peer
        .shared
        .storage
        .read(move |db| db.unit().pending_invites(account, at))
        .await
    {
        Ok(invites) => synesis_proto::message::InvitesReply {
            request_id,
            invites,
        }
        .into(),
        Err(e) => internal(e, request_id),
    }
}

/// `synesis cloud invites revoke INVITEE` (the owner's).
async fn revoke_invites(peer: &Peer, request_id: RequestId, invitee: String) -> Message {
    let (account, actor) = (peer.device.account_id, peer.device.id.to_string());
    let who = invitee.clone();
    match peer
        .shared
        .storage
        .write(move |db| db.revoke_invites(account, &who, &actor, now()))
        .await
    {
        Ok(0) => error_msg(
            ErrorCode::NOT_FOUND,
            format!("no pending invitation for {invitee:?}"),
            Some(request_id),
        ),
        Ok(n) => synesis_proto::message::InviteRevoked {
            request_id,
            invitee,
            revoked: u32::try_from(n).unwrap_or(u32::MAX),
        }
        .into(),
        Err(e) => internal(e, request_id),
    }
}
