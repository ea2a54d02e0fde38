//! What each role may do in an account: one table, checked in one place — when a device opens
//! a stream (`endpoint::stream`), against the device's role read fresh from the database
//! (ARCHITECTURE.md §4, *Roles*; PROTOCOL.md §2, *Roles*).
//!
//! A device acts with the role of the member it belongs to. The roles are ordered: an owner may
//! do all an editor may, an editor all a commenter may, a commenter all a viewer may.

use synesis_proto::MessageType;
use synesis_proto::message::Role;

/// The rank of a role: higher may do more.
fn rank(role: Role) -> u8 {
    match role {
        Role::Viewer => 0,
        Role::Commenter => 1,
        Role::Editor => 2,
        Role::Owner => 3,
    }
}

/// The least role that may open a stream with `first`; `None` for a message that opens no
/// stream a device may open (replies, and frames that only follow a stream's first).
///
/// Every message type is named here (no wildcard), so a new one cannot be added without
/// deciding who may send it.
pub fn least_role(first: MessageType) -> Option<Role> {
    use MessageType as T;
    match first {
        // The device's own session and identity: every member's device keeps those.
        T::Hello | T::DeviceLeave | T::CertRenew => Some(Role::Viewer),
        // Reading the account: usage and its adapters, prices.
        T::UsageRequest | T::AdaptersRequest | T::PriceRequest => Some(Role::Viewer),
        // Asking: it spends the account's credit and quota.
        T::EscalationRequest | T::EscalationResume => Some(Role::Commenter),
        // Changing what the account serves, and seeing who is in it.
        T::UploadBegin | T::AdapterRemove | T::MembersRequest => Some(Role::Editor),
        // Money and people: the owner's.
        T::TopupRequest
        | T::InviteCreate
        | T::InvitesRequest
        | T::InviteRevoke
        | T::MemberRemove
        | T::HandoverOffer => Some(Role::Owner),
        // Joining another account is the invitee's own act, whatever its role here; taking an
        // account over is the offered member's (the offer names them).
        T::HandoverAccept => Some(Role::Viewer),
        // On a connection without a certificate, not a device's stream.
        T::EnrollRequest => None,
        // Replies, and frames that only follow the first of a stream.
        T::Welcome
        | T::Heartbeat
        | T::HeartbeatAck
        | T::Prewarm
        | T::Drain
        | T::ErrorMsg
        | T::BalanceUpdate
        | T::EnrollResponse
        | T::EscalationChunk
        | T::EscalationDone
        | T::EscalationCancel
        | T::UploadResume
        | T::UploadChunk
        | T::UploadDone
        | T::UploadComplete
        | T::AdaptersReply
        | T::AdapterRemoved
        | T::UsageReply
        | T::TopupReply
        | T::InviteCreated
        | T::MembersReply
        | T::PriceReply
        | T::DeviceLeft
        | T::CertRenewed
        | T::MemberRemoved
        | T::HandoverOffered
        | T::HandoverAccepted
        | T::InvitesReply
        | T::InviteRevoked => None,
    }
}

/// The role as people read it.
pub fn name(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Editor => "editor",
        Role::Commenter => "commenter",
        Role::Viewer => "viewer",
    }
}

/// Whether a device whose member has `role` may open a stream with `first`.
pub fn allows(role: Role, first: MessageType) -> bool {
    least_role(first).is_some_and(|least| rank(role) >= rank(least))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole matrix, written out: every message a device opens a stream with, and for
    /// each role whether it may (owner, editor, commenter, viewer).
    #[test]
    fn the_role_matrix() {
        use MessageType as T;
        let matrix: &[(MessageType, [bool; 4])] = &[
            (T::Hello, [true, true, true, true]),
            (T::DeviceLeave, [true, true, true, true]),
            (T::CertRenew, [true, true, true, true]),
            (T::UsageRequest, [true, true, true, true]),
            (T::AdaptersRequest, [true, true, true, true]),
            (T::PriceRequest, [true, true, true, true]),
            (T::HandoverAccept, [true, true, true, true]),
            (T::EscalationRequest, [true, true, true, false]),
            (T::EscalationResume, [true, true, true, false]),
            (T::UploadBegin, [true, true, false, false]),
            (T::AdapterRemove, [true, true, false, false]),
            (T::MembersRequest, [true, true, false, false]),
            (T::TopupRequest, [true, false, false, false]),
            (T::InviteCreate, [true, false, false, false]),
            (T::MemberRemove, [true, false, false, false]),
            (T::HandoverOffer, [true, false, false, false]),
            (T::InvitesRequest, [true, false, false, false]),
            (T::InviteRevoke, [true, false, false, false]),
        ];
        let roles = [Role::Owner, Role::Editor, Role::Commenter, Role::Viewer];
        for (t, expected) in matrix {
            for (role, allowed) in roles.iter().zip(expected) {
                assert_eq!(allows(*role, *t), *allowed, "{role:?} {t:?}");
            }
        }
        // Every other type opens no stream, for anyone; and the matrix names every one that
        // does.
        for t in MessageType::ALL {
            let listed = matrix.iter().any(|(m, _)| m == t);
            assert_eq!(
                least_role(*t).is_some(),
                listed,
                "{t:?} is missing from the matrix"
            );
            if !listed {
                assert!(roles.iter().all(|r| !allows(*r, *t)), "{t:?}");
            }
        }
    }
}
