//! A synchronous rtnetlink client for the few requests berth makes of the
//! kernel's network stack: a job's veth pair, addresses, the default route,
//! a link's MTU. It blocks, and its socket is in the network namespace of the
//! thread that opens it: the agent uses it off the async runtime, the job's
//! init inside the job's namespace before it execs dockerd. A refusal comes
//! back as the kernel's errno; what an errno means (gone, already there) is
//! for the caller to say.

use std::net::Ipv4Addr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// The kernel refused the request.
    #[error("{0}")]
    Refused(Errno),
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("unreadable netlink reply: {0}")]
    Reply(#[source] netlink_packet_core::DecodeError),
    #[error("the kernel's reply carries no {0}")]
    Missing(&'static str),
}

impl RtnlError {
    /// The errno of the kernel's refusal, if it refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RtnlError::Refused(e) => Some(*e),
            _ => None,
        }
    }
}

/// What [`Rtnl::set_link`] changes; the rest stays as it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkChange<'a> {
    pub name: Option<&'a str>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// Moves the link into the network namespace of this process.
    pub netns_pid: Option<u32>,
}

pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, RtnlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// The index of the link called `name` (ENODEV when there is none).
    pub fn link_index(&mut self, name: &str) -> Result<u32, RtnlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        self.exchange(RouteNetlinkMessage::GetLink(m), 0)?
            .into_iter()
            .find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })
            .ok_or(RtnlError::Missing("link"))
    }

    /// The kernel's description of link `index` (ENODEV when there is none).
    pub fn link(&mut self, index: u32) -> Result<LinkMessage, RtnlError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.exchange(RouteNetlinkMessage::GetLink(m), 0)?
            .into_iter()
            .find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .ok_or(RtnlError::Missing("link"))
    }

    /// The MTU of link `index`.
    pub fn link_mtu(&mut self, index: u32) -> Result<u32, RtnlError> {
        self.link(index)?
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .ok_or(RtnlError::Missing("MTU"))
    }

    /// Creates a veth pair, both ends down (EEXIST when a link of either
    /// name is there). With `peer_netns_pid`, the peer is made in the
    /// network namespace of that process.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        mtu: u32,
        peer_netns_pid: Option<u32>,
    ) -> Result<(), RtnlError> {
        self.exchange(
            RouteNetlinkMessage::NewLink(veth_request(name, peer, mtu, peer_netns_pid)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    pub fn set_link(&mut self, index: u32, change: LinkChange) -> Result<(), RtnlError> {
        self.exchange(RouteNetlinkMessage::SetLink(set_request(index, change)), 0)
            .map(drop)
    }

    /// Deletes the link called `name`, and its peer with it (ENODEV when
    /// there is none).
    pub fn delete_link(&mut self, name: &str) -> Result<(), RtnlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        self.exchange(RouteNetlinkMessage::DelLink(m), 0).map(drop)
    }

    /// Adds `ip/prefix` to link `index`; `replace` makes it the same when
    /// it is there already (else EEXIST).
    pub fn add_address(
        &mut self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
        replace: bool,
    ) -> Result<(), RtnlError> {
        let flags = NLM_F_CREATE | if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
        self.exchange(
            RouteNetlinkMessage::NewAddress(address_request(index, ip, prefix)),
            flags,
        )
        .map(drop)
    }

    /// Takes `ip/prefix` off link `index` (EADDRNOTAVAIL when it has none).
    pub fn delete_address(
        &mut self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), RtnlError> {
        self.exchange(
            RouteNetlinkMessage::DelAddress(address_request(index, ip, prefix)),
            0,
        )
        .map(drop)
    }

    /// The IPv4 addresses of link `index`, with their prefix lengths.
    #[cfg(test)]
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, RtnlError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        let all = self.exchange(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP)?;
        Ok(all
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(std::net::IpAddr::V4(ip)) => {
                            Some((*ip, a.header.prefix_len))
                        }
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds the IPv4 default route through `gateway` (EEXIST when there is
    /// one).
    pub fn add_default_route(&mut self, gateway: Ipv4Addr) -> Result<(), RtnlError> {
        self.exchange(
            RouteNetlinkMessage::NewRoute(default_route_request(gateway)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// The link the IPv4 default route of the main table leaves through, if
    /// there is one.
    pub fn default_route_link(&mut self) -> Result<Option<u32>, RtnlError> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let routes: Vec<RouteMessage> = self
            .exchange(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect();
        Ok(default_link(&routes))
    }

    /// Sends `msg` as request and returns the messages of the kernel's
    /// reply, once its ack (or the end of a dump) has come.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let req = encode(msg, flags, self.seq);
        loop {
            match self.socket.send(&req, 0) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RtnlError::Socket(e)),
            }
        }
        let mut out = Vec::new();
        loop {
            let datagram = match self.socket.recv_from_full() {
                Ok((d, _)) => d,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RtnlError::Socket(e)),
            };
            if read_reply(&datagram, self.seq, &mut out)? {
                return Ok(out);
            }
        }
    }
}

/// The bytes of request `seq`, asking for an ack.
fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
    packet.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    packet.header.sequence_number = seq;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// Reads one datagram of the reply to request `seq` into `out`; true once
/// the reply is complete. Messages of other requests are skipped.
fn read_reply(
    mut data: &[u8],
    seq: u32,
    out: &mut Vec<RouteNetlinkMessage>,
) -> Result<bool, RtnlError> {
    while !data.is_empty() {
        let head = NetlinkBuffer::new_checked(data).map_err(RtnlError::Reply)?;
        // Messages in a datagram start on 4-byte boundaries.
        let len = head.length() as usize;
        let (this, rest) = data.split_at(len);
        data = rest.get(len.next_multiple_of(4) - len..).unwrap_or(&[]);
        if head.sequence_number() != seq {
            continue;
        }
        let msg =
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(this).map_err(RtnlError::Reply)?;
        match msg.payload {
            NetlinkPayload::Error(e) => {
                return match e.code {
                    None => Ok(true),
                    Some(c) => Err(RtnlError::Refused(Errno::from_raw(-c.get()))),
                };
            }
            NetlinkPayload::Done(d) if d.code == 0 => return Ok(true),
            NetlinkPayload::Done(d) => return Err(RtnlError::Refused(Errno::from_raw(-d.code))),
            NetlinkPayload::InnerMessage(m) => out.push(m),
            _ => {}
        }
    }
    Ok(false)
}

fn veth_request(name: &str, peer: &str, mtu: u32, peer_netns_pid: Option<u32>) -> LinkMessage {
    let mut p = LinkMessage::default();
    p.attributes = vec![LinkAttribute::IfName(peer.into()), LinkAttribute::Mtu(mtu)];
    p.attributes
        .extend(peer_netns_pid.map(LinkAttribute::NetNsPid));
    let mut m = LinkMessage::default();
    m.attributes = vec![
        LinkAttribute::IfName(name.into()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]),
    ];
    m
}

fn set_request(index: u32, change: LinkChange) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if change.up {
        m.header.flags |= LinkFlags::Up;
        m.header.change_mask |= LinkFlags::Up;
    }
    if let Some(n) = change.name {
        m.attributes.push(LinkAttribute::IfName(n.into()));
    }
    if let Some(mtu) = change.mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(pid) = change.netns_pid {
        m.attributes.push(LinkAttribute::NetNsPid(pid));
    }
    m
}

fn address_request(index: u32, ip: Ipv4Addr, prefix: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = prefix;
    m.header.scope = AddressScope::Universe;
    m.header.index = index;
    m.attributes = vec![
        AddressAttribute::Local(ip.into()),
        AddressAttribute::Address(ip.into()),
    ];
    m
}

fn default_route_request(gateway: Ipv4Addr) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = RouteHeader {
        address_family: AddressFamily::Inet,
        table: RouteHeader::RT_TABLE_MAIN,
        protocol: RouteProtocol::Boot,
        scope: RouteScope::Universe,
        kind: RouteType::Unicast,
        ..Default::default()
    };
    m.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(gateway))];
    m
}

/// The link of the preferred (lowest metric) IPv4 default route of the main
/// table among `routes`; a multipath route's first hop.
fn default_link(routes: &[RouteMessage]) -> Option<u32> {
    routes
        .iter()
        .filter(|r| {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(r.header.table.into());
            r.header.address_family == AddressFamily::Inet
                && r.header.destination_prefix_length == 0
                && r.header.kind == RouteType::Unicast
                && table == u32::from(RouteHeader::RT_TABLE_MAIN)
        })
        .filter_map(|r| {
            let metric = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Priority(p) => Some(*p),
                    _ => None,
                })
                .unwrap_or(0);
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
                _ => None,
            })?;
            Some((metric, oif))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, oif)| oif)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DoneMessage, ErrorMessage, NLM_F_MULTIPART};

    /// One reply message to request `seq`, as the kernel sends it.
    fn reply(seq: u32, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), payload);
        m.header.sequence_number = seq;
        m.header.flags = NLM_F_MULTIPART;
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        // The next message starts on a 4-byte boundary.
        buf.resize(buf.len().next_multiple_of(4), 0);
        buf
    }

    fn error(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(code);
        // The kernel quotes the request's header.
        e.header = vec![0; 16];
        NetlinkPayload::Error(e)
    }

    fn link(index: u32, name: &str) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.attributes.push(LinkAttribute::IfName(name.into()));
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l))
    }

    #[test]
    fn a_refusal_is_its_errno_and_an_ack_ends_the_reply() {
        let mut out = Vec::new();
        let e = read_reply(&reply(7, error(-libc::ENODEV)), 7, &mut out).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::ENODEV));
        assert!(e.to_string().contains("ENODEV"), "{e}");

        // A reply and its ack in one datagram, after a stray message of an
        // earlier request.
        let mut d = reply(6, error(-libc::EEXIST));
        d.extend(reply(7, link(3, "bhx")));
        d.extend(reply(7, error(0)));
        assert!(read_reply(&d, 7, &mut out).unwrap());
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], RouteNetlinkMessage::NewLink(l) if l.header.index == 3));

        // A dump spans datagrams until its end.
        let mut out = Vec::new();
        assert!(!read_reply(&reply(8, link(1, "lo")), 8, &mut out).unwrap());
        assert!(
            read_reply(
                &reply(8, NetlinkPayload::Done(DoneMessage::default())),
                8,
                &mut out
            )
            .unwrap()
        );
        assert_eq!(out.len(), 1);
        let mut failed = DoneMessage::default();
        failed.code = -libc::EINTR;
        let e = read_reply(&reply(8, NetlinkPayload::Done(failed)), 8, &mut out).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::EINTR));

        assert!(matches!(
            read_reply(&[1, 2, 3], 8, &mut out),
            Err(RtnlError::Reply(_))
        ));
    }

    #[test]
    fn a_veth_request_names_both_ends_with_the_mtu_and_the_peers_namespace() {
        let bytes = encode(
            RouteNetlinkMessage::NewLink(veth_request("bhabc", "bjabc", 1400, Some(77))),
            NLM_F_CREATE | NLM_F_EXCL,
            5,
        );
        let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).unwrap();
        assert_eq!(
            m.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(m.header.sequence_number, 5);
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) = m.payload else {
            panic!("not a new link: {:?}", m.payload)
        };
        assert!(
            l.attributes
                .contains(&LinkAttribute::IfName("bhabc".into()))
        );
        assert!(l.attributes.contains(&LinkAttribute::Mtu(1400)));
        let info = l
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i),
                _ => None,
            })
            .unwrap();
        assert!(info.contains(&LinkInfo::Kind(InfoKind::Veth)));
        let peer = info
            .iter()
            .find_map(|i| match i {
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p),
                _ => None,
            })
            .expect("the peer");
        assert_eq!(
            peer.attributes,
            [
                LinkAttribute::IfName("bjabc".into()),
                LinkAttribute::Mtu(1400),
                LinkAttribute::NetNsPid(77)
            ]
        );
        let here = veth_request("bhabc", "bjabc", 1400, None);
        assert!(
            !format!("{here:?}").contains("NetNs"),
            "without a pid the peer stays: {here:?}"
        );
    }

    #[test]
    fn a_change_sets_only_what_it_names() {
        let up = set_request(
            4,
            LinkChange {
                up: true,
                ..Default::default()
            },
        );
        assert_eq!(up.header.index, 4);
        assert!(up.header.flags.contains(LinkFlags::Up));
        assert!(up.header.change_mask.contains(LinkFlags::Up));
        assert!(up.attributes.is_empty());
        let moved = set_request(
            4,
            LinkChange {
                name: Some("eth0"),
                netns_pid: Some(42),
                ..Default::default()
            },
        );
        assert!(moved.header.change_mask.is_empty(), "the link stays down");
        assert_eq!(
            moved.attributes,
            [
                LinkAttribute::IfName("eth0".into()),
                LinkAttribute::NetNsPid(42)
            ]
        );
    }

    fn route(table: u8, dst_len: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.table = table;
        r.header.destination_prefix_length = dst_len;
        r.header.kind = RouteType::Unicast;
        r.attributes = attrs;
        r
    }

    #[test]
    fn the_default_link_is_the_main_tables_preferred_default_route() {
        use RouteAttribute::{Oif, Priority, Table};
        let main = RouteHeader::RT_TABLE_MAIN;
        assert_eq!(default_link(&[]), None);
        let routes = [
            // A subnet route, another table's default, a backup default.
            route(main, 24, vec![Oif(2)]),
            route(200, 0, vec![Table(200), Oif(3)]),
            route(main, 0, vec![Table(254), Priority(600), Oif(4)]),
            route(main, 0, vec![Table(254), Priority(100), Oif(5)]),
        ];
        assert_eq!(default_link(&routes), Some(5));
        assert_eq!(default_link(&routes[..3]), Some(4));
        assert_eq!(default_link(&routes[..2]), None);
        let mut hop = netlink_packet_route::route::RouteNextHop::default();
        hop.interface_index = 9;
        let multipath = route(main, 0, vec![RouteAttribute::MultiPath(vec![hop])]);
        assert_eq!(default_link(&[multipath]), Some(9));
        // The job's own: through its gateway, in the main table.
        let ours = default_route_request(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(ours.header.table, main);
        assert_eq!(ours.header.destination_prefix_length, 0);
        assert_eq!(
            ours.attributes,
            [RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                10, 0, 0, 1
            )))]
        );
    }
}
