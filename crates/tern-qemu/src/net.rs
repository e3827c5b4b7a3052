//! Network interfaces of a VM: typed description → `-netdev tap` + `virtio-net-pci`.
//!
//! A NIC is a tap device in the host's network namespace (attached to a tenant bridge by
//! whoever owns the host's network, e.g. tern-lab) and a virtio-net device in the guest.
//! Both ends of a migration are started from the same spec, so the guest keeps its MAC
//! address: the MAC is fixed per VM, derived from the VM's name, never random (libvirt
//! stores a generated MAC in the domain XML for the same reason, `virDomainNetGenerateMAC`
//! in `src/conf/domain_conf.c`). After the switch QEMU's `announce-self` sends RARPs from
//! that MAC so the tenant network learns the new port.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::QemuError;

/// Linux's limit on interface names (`IFNAMSIZ` 16 including the NUL).
const MAX_IFNAME: usize = 15;

/// A 48-bit Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A deterministic, locally administered unicast MAC for NIC `index` of VM `vm_name`.
    ///
    /// Prefix `52:54` (QEMU's usual prefix: bit 1 of the first octet set = locally
    /// administered, bit 0 clear = unicast), then 32 bits of FNV-1a over the name and the
    /// index. FNV-1a is fixed by its definition, unlike `std`'s hasher, so the same VM gets
    /// the same MAC from every tern build on every host.
    pub fn for_vm(vm_name: &str, index: u32) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in vm_name
            .as_bytes()
            .iter()
            .chain(&[0u8])
            .chain(&index.to_be_bytes())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let t = h.to_be_bytes();
        MacAddress([0x52, 0x54, t[4], t[5], t[6], t[7]])
    }

    /// True if the locally-administered bit is set and the multicast bit clear.
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0x02 != 0 && self.0[0] & 0x01 == 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddress {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            QemuError::InvalidSpec(format!(
                "MAC address {s:?} is invalid: expected six hex octets like 52:54:00:12:34:56"
            ))
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (o, p) in m.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        let mac = MacAddress(m);
        if m[0] & 0x01 != 0 {
            return Err(QemuError::InvalidSpec(format!(
                "MAC address {s:?} is a multicast address: a NIC needs a unicast one \
                 (first octet even, e.g. 52:…)"
            )));
        }
        Ok(mac)
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One virtio-net NIC backed by a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Host tap interface name (≤ 15 characters). QEMU (as root) creates it if it does not
    /// exist; `script=no`: tern (or the lab) attaches it to the bridge, not `/etc/qemu-ifup`.
    pub tap: String,
    /// Guest MAC; `None` derives it from the VM name and the NIC's index
    /// ([`MacAddress::for_vm`]).
    #[serde(default)]
    pub mac: Option<MacAddress>,
}

impl NicSpec {
    /// A NIC on `tap` with the derived MAC.
    pub fn on_tap(tap: impl Into<String>) -> Self {
        Self {
            tap: tap.into(),
            mac: None,
        }
    }

    /// The MAC this NIC gets as NIC `index` of VM `vm_name`.
    pub fn mac_for(&self, vm_name: &str, index: u32) -> MacAddress {
        self.mac
            .unwrap_or_else(|| MacAddress::for_vm(vm_name, index))
    }

    /// Checks the tap name and an explicit MAC.
    pub fn validate(&self) -> Result<(), QemuError> {
        if self.tap.is_empty()
            || self.tap.len() > MAX_IFNAME
            || !self
                .tap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(QemuError::InvalidSpec(format!(
                "tap name {:?} is invalid: use 1-{MAX_IFNAME} characters from a-z, A-Z, 0-9, \
                 '-', '_' and '.'",
                self.tap
            )));
        }
        if let Some(mac) = self.mac
            && mac.0[0] & 0x01 != 0
        {
            return Err(QemuError::InvalidSpec(format!(
                "MAC address {mac} is a multicast address: a NIC needs a unicast one"
            )));
        }
        Ok(())
    }

    /// `-netdev` and `-device` values for NIC `index` of VM `vm_name`.
    ///
    /// `romfile=` (empty) drops the iPXE option ROM: tern guests never boot from the
    /// network, and the ROM's size is part of the migrated RAM blocks, so two hosts with
    /// different `ipxe-qemu` packages would refuse each other's stream (libvirt's
    /// `<rom enabled='no'/>`).
    pub fn args(&self, vm_name: &str, index: u32) -> [String; 2] {
        let mac = self.mac_for(vm_name, index);
        [
            format!(
                "tap,id=net{index},ifname={},script=no,downscript=no",
                self.tap
            ),
            format!("virtio-net-pci,id=nic{index},netdev=net{index},mac={mac},romfile="),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_mac_is_stable_local_unicast_and_distinct() {
        let a = MacAddress::for_vm("web", 0);
        assert_eq!(a, MacAddress::for_vm("web", 0));
        assert!(a.is_local_unicast());
        assert_eq!(&a.0[..2], &[0x52, 0x54]);
        assert_ne!(a, MacAddress::for_vm("web", 1));
        assert_ne!(a, MacAddress::for_vm("db", 0));
        // Fixed across builds: FNV-1a, not std's randomly seeded hasher.
        assert_eq!(a.to_string(), MacAddress::for_vm("web", 0).to_string());
        assert_eq!(a.to_string().parse::<MacAddress>().unwrap(), a);
    }

    #[test]
    fn mac_parsing_names_the_bad_value() {
        let e = "52:54:00:12:34"
            .parse::<MacAddress>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"52:54:00:12:34\"") && e.contains("six hex octets"),
            "{e}"
        );
        assert!("52:54:00:12:34:zz".parse::<MacAddress>().is_err());
        let e = "01:00:5e:00:00:01"
            .parse::<MacAddress>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("multicast"), "{e}");
        assert_eq!(
            "52:54:00:AB:cd:01"
                .parse::<MacAddress>()
                .unwrap()
                .to_string(),
            "52:54:00:ab:cd:01"
        );
    }

    #[test]
    fn nic_args_name_the_tap_and_mac() {
        let mut n = NicSpec::on_tap("tap-web0");
        let [netdev, device] = n.args("web", 0);
        assert_eq!(
            netdev,
            "tap,id=net0,ifname=tap-web0,script=no,downscript=no"
        );
        let mac = MacAddress::for_vm("web", 0);
        assert_eq!(
            device,
            format!("virtio-net-pci,id=nic0,netdev=net0,mac={mac},romfile=")
        );
        n.mac = Some("52:54:00:00:00:07".parse().unwrap());
        assert!(n.args("web", 3)[1].contains("mac=52:54:00:00:00:07"));
        assert!(n.args("web", 3)[0].contains("id=net3"));
    }

    #[test]
    fn tap_names_are_validated() {
        assert!(NicSpec::on_tap("tap0").validate().is_ok());
        let e = NicSpec::on_tap("a-very-long-tap-name")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"a-very-long-tap-name\"") && e.contains("15"),
            "{e}"
        );
        assert!(NicSpec::on_tap("tap 0").validate().is_err());
        assert!(NicSpec::on_tap("").validate().is_err());
    }
}
