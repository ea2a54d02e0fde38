//! Which of the cloud's nodes the device dials (PROTOCOL.md §2, *Several nodes*).
//!
//! A cloud may be several nodes on one database. The device knows them from its setup token
//! and from each `Welcome` (the other nodes serving then), and keeps the list in its identity.
//! It dials the node it was on; when a dial fails it moves to the next one in the list (the
//! reconnect machine's backoff still spaces the attempts), and a draining node's hint sends it
//! to the node that hint names. Any node serves any device: a request left running on a node
//! the device lost is taken over by the node it reaches once the first is known dead.
//!
//! Pure: no IO, no clock. The driver and the direct route ask it where to dial.

/// Addresses kept at most (the first, the token's, always among them).
pub const NODES_MAX: usize = 16;
/// The longest address kept (`host:port`).
const ADDR_BYTES_MAX: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// The token's address first, then the others, each once.
    addrs: Vec<String>,
    /// The one dialled next (or connected to).
    current: usize,
}

impl Nodes {
    /// The token's address `home`, and the other nodes known (`IdentityInfo::nodes`).
    pub fn new(home: &str, others: &[String]) -> Nodes {
        let mut nodes = Nodes {
            addrs: vec![home.to_owned()],
            current: 0,
        };
        nodes.add(others);
        nodes
    }

    /// The address to dial.
    pub fn current(&self) -> &str {
        &self.addrs[self.current]
    }

    /// Every address known, the token's first.
    pub fn all(&self) -> &[String] {
        &self.addrs
    }

    /// The addresses beside the token's, as the identity keeps them.
    pub fn others(&self) -> &[String] {
        &self.addrs[1..]
    }

    /// A dial of [`current`](Self::current) failed: the next node is dialled next.
    pub fn failed(&mut self) {
        self.current = (self.current + 1) % self.addrs.len();
    }

    /// A `Welcome` named the other nodes serving now: they replace the ones learned before
    /// (a node gone from the cloud is forgotten; the token's and the current one stay).
    /// Whether the list changed.
    pub fn learned(&mut self, others: &[String]) -> bool {
        let before = self.addrs.clone();
        let current = self.current().to_owned();
        self.addrs.truncate(1);
        self.add(std::slice::from_ref(&current));
        self.add(others);
        self.current = self.position(&current).unwrap_or(0);
        self.addrs != before
    }

    /// A draining node named the node to go to: it is dialled next.
    pub fn go_to(&mut self, addr: &str) {
        self.add(&[addr.to_owned()]);
        if let Some(i) = self.position(addr) {
            self.current = i;
        }
    }

    fn position(&self, addr: &str) -> Option<usize> {
        self.addrs.iter().position(|a| a == addr)
    }

    fn add(&mut self, addrs: &[String]) {
        for addr in addrs {
            if self.addrs.len() >= NODES_MAX {
                return;
            }
            if plausible(addr) && self.position(addr).is_none() {
                self.addrs.push(addr.clone());
            }
        }
    }
}

/// `host:port`, short, printable: what a node may hand a device (anything else a peer sends
/// is dropped, never dialled).
fn plausible(addr: &str) -> bool {
    addr.len() <= ADDR_BYTES_MAX
        && addr.chars().all(|c| c.is_ascii_graphic())
        && addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|&s| s.to_owned()).collect()
    }

    #[test]
    fn it_dials_the_token_first_and_moves_on_each_failure_round_the_list() {
        let mut n = Nodes::new("a:1", &strings(&["b:1", "c:1"]));
        assert_eq!(n.current(), "a:1");
        n.failed();
        assert_eq!(n.current(), "b:1");
        n.failed();
        assert_eq!(n.current(), "c:1");
        n.failed();
        assert_eq!(n.current(), "a:1");
    }

    #[test]
    fn a_cloud_of_one_node_is_dialled_again_and_again() {
        let mut n = Nodes::new("a:1", &[]);
        n.failed();
        assert_eq!(n.current(), "a:1");
        assert!(n.others().is_empty());
    }

    #[test]
    fn a_welcome_replaces_the_others_and_keeps_the_node_it_came_from() {
        let mut n = Nodes::new("a:1", &strings(&["b:1"]));
        n.failed(); // on b now
        assert!(n.learned(&strings(&["c:1", "a:1"])));
        assert_eq!(n.current(), "b:1", "still on the node that welcomed it");
        assert_eq!(n.all(), strings(&["a:1", "b:1", "c:1"]));
        assert!(!n.learned(&strings(&["c:1", "a:1"])), "nothing new");
        // b said it is alone now: c is forgotten, a (the token's) and b stay.
        assert!(n.learned(&[]));
        assert_eq!(n.all(), strings(&["a:1", "b:1"]));
        assert_eq!(n.current(), "b:1");
    }

    #[test]
    fn a_drain_hint_is_dialled_next() {
        let mut n = Nodes::new("a:1", &strings(&["b:1", "c:1"]));
        n.go_to("c:1");
        assert_eq!(n.current(), "c:1");
        n.go_to("d:1");
        assert_eq!(n.current(), "d:1", "a node not known yet is added");
    }

    #[test]
    fn what_a_peer_sends_is_bounded_and_checked() {
        let junk = strings(&["", "no-port", ":1", "a:0", "a:99999", "sp ace:1", "a:1"]);
        let mut n = Nodes::new("a:1", &junk);
        assert_eq!(n.all(), strings(&["a:1"]));
        let many: Vec<String> = (0..100).map(|i| format!("h{i}:1")).collect();
        n.learned(&many);
        assert_eq!(n.all().len(), NODES_MAX);
        n.go_to(&format!("{}:1", "x".repeat(300)));
        assert_eq!(n.current(), "a:1", "an absurd hint is not followed");
    }
}
