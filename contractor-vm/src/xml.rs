//! The libvirt domain XML of a builder VM, written and read back. The invariant this module
//! keeps: a builder domain has exactly one disk (its qcow2 overlay), no network interface,
//! no graphics, USB or sound, and two virtio-serial channels (control and tunnel) whose host
//! ends are Unix sockets that libvirt places itself. Every text and attribute value is
//! escaped, so a path or command line cannot inject elements.
//!
//! Every read-only file behind a disk (the image's disk, a snapshot's root and build disk)
//! is written out as the disk's whole `<backingStore>` chain, each layer with
//! `<seclabel model='dac' relabel='no'/>`: under `qemu:///system` libvirt then leaves their
//! owner alone instead of handing them to QEMU's user, so a QEMU taken over by its guest
//! cannot rewrite what later builds start from. The serial console has no host end
//! (`type='null'`) and only its log: QEMU needs no pty.

use std::path::{Path, PathBuf};

use contractor_protocol::agent::{CONTROL_PORT, TUNNEL_PORT};
use contractor_protocol::vm::{Accel, VmSpec};

use crate::launcher::{QemuPolicy, POLICY_ENV};
use crate::owner::VmOwner;

/// libvirt's QEMU namespace, for `<qemu:commandline>` (the launcher's environment).
pub const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// The machine type of every builder (libvirt expands it to the QEMU version's).
pub const MACHINE: &str = "q35";

/// The XML namespace of Contractor's `<metadata>` element.
pub const METADATA_NAMESPACE: &str = "https://contractor.invalid/vm/1";

/// Errors reading a domain's XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// libvirt returned XML that does not parse.
    #[error("libvirt returned unparsable domain XML")]
    Parse(#[source] roxmltree::Error),
}

/// Escapes `&`, `<`, `>`, `'` and `"` for use in XML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn esc_path(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

/// Where the host end of `port` of VM `name` is, when the caller picks the directory.
pub fn socket_path(dir: &Path, name: &str, port: &str) -> std::path::PathBuf {
    let short = port.rsplit('.').next().unwrap_or(port);
    dir.join(format!("{name}.{short}"))
}

/// A read-only file behind a disk, one layer of its backing chain: QEMU reads it and never
/// writes it, and libvirt is told not to relabel it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The file.
    pub path: PathBuf,
    /// Its format as `qemu-img` names it (`qcow2`, `raw`).
    pub format: String,
}

/// The files behind a builder's disks.
#[derive(Debug, Clone, Copy)]
pub struct Disks<'a> {
    /// `vda`: the qcow2 overlay on the image.
    pub overlay: &'a Path,
    /// The overlay's backing chain, nearest first (the image's disk, or a snapshot's root
    /// and then the image's disk): written out whole, so libvirt probes and relabels none.
    pub overlay_backing: &'a [Layer],
    /// `vdb`: the build disk (an ext4), if the VM has one.
    pub build: Option<&'a Path>,
    /// The build disk's format: raw when made for this VM, qcow2 over a snapshot's disk
    /// when the VM is restored.
    pub build_format: DiskFormat,
    /// The build disk's backing chain (a snapshot's build disk), nearest first.
    pub build_backing: &'a [Layer],
}

/// The `<backingStore>` chain of `layers` (nearest first), ending in an empty one: the last
/// layer stands on nothing else. With `keep_owner` each layer is marked not to be
/// relabelled (libvirt's DAC driver; it exists only where libvirt runs privileged: under
/// `qemu:///session` a `<seclabel model='dac'>` fails the domain, and nothing is relabelled
/// there anyway). No layers: no element (libvirt then finds none behind a raw file).
fn backing_xml(layers: &[Layer], indent: usize, keep_owner: bool) -> String {
    let mut out = String::new();
    if layers.is_empty() {
        return out;
    }
    for (depth, layer) in layers.iter().enumerate() {
        let pad = " ".repeat(indent + 2 * depth);
        let seclabel = if keep_owner {
            format!("\n{pad}    <seclabel model='dac' relabel='no'/>\n{pad}  ")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{pad}<backingStore type='file'>\n{pad}  <format type='{}'/>\n\
             {pad}  <source file='{}'>{seclabel}</source>\n",
            escape(&layer.format),
            esc_path(&layer.path)
        ));
    }
    out.push_str(&format!(
        "{}<backingStore/>\n",
        " ".repeat(indent + 2 * layers.len())
    ));
    for depth in (0..layers.len()).rev() {
        out.push_str(&format!(
            "{}</backingStore>\n",
            " ".repeat(indent + 2 * depth)
        ));
    }
    out
}

/// A disk file's format, as libvirt names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw file.
    Raw,
    /// A qcow2 image (here always an overlay on a backing file).
    Qcow2,
}

impl DiskFormat {
    fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Who a domain is: its name, and the UUID it must have (a VM restored from a snapshot
/// keeps the saved domain's; libvirt picks one otherwise).
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// The domain name.
    pub name: &'a str,
    /// The domain UUID, if it is given.
    pub uuid: Option<&'a str>,
    /// The VM generation ID the domain was saved with, if it is restored (libvirt checks
    /// that it matches, then gives the restored VM a new one); libvirt makes one otherwise.
    pub genid: Option<&'a str>,
}

impl<'a> Identity<'a> {
    /// A domain called `name` whose UUID libvirt picks.
    pub fn named(name: &'a str) -> Identity<'a> {
        Identity {
            name,
            uuid: None,
            genid: None,
        }
    }
}

/// The kernel command line a VM boots with: the image's, plus `no_timer_check` under TCG.
/// An emulated CPU on a busy host can miss the kernel's early check that the IO-APIC timer
/// ticks, and the guest then panics in `setup_IO_APIC` before it starts (seen in CI with two
/// builds and a compile on two cores); the check proves nothing about a virtual timer.
pub fn kernel_cmdline(image_cmdline: &str, accel: Accel) -> String {
    let tcg = matches!(accel, Accel::Tcg | Accel::Auto);
    if tcg
        && !image_cmdline
            .split_whitespace()
            .any(|w| w == "no_timer_check")
    {
        format!("{image_cmdline} no_timer_check")
    } else {
        image_cmdline.to_string()
    }
}

/// QEMU started through our launcher (`contractor-qemu`, see [`crate::launcher`]): the
/// domain's `<emulator>` is the launcher, and the policy reaches it in its environment.
#[derive(Debug, Clone, Copy)]
pub struct Emulator<'a> {
    /// The launcher's path.
    pub launcher: &'a Path,
    /// What it confines QEMU to.
    pub policy: &'a QemuPolicy,
}

/// The CPU features a build's guest never gets under KVM: hardware virtualisation. With the
/// host's CPU passed through, `vmx`/`svm` would let the guest run nested VMs and so drive the
/// host kernel's nested-virtualisation code (the KVM code that guest-to-host escapes have
/// come through), which no confinement of QEMU covers. A build needs neither. Under TCG the
/// CPU is left as QEMU's `maximum`: it has no VMX, its SVM is QEMU's own emulation inside the
/// confined QEMU process, and QEMU 7.2's TCG guest with `svm=off` did not start our agent
/// (glibc's `_dl_get_origin` assertion in the guest; `vmx=off` alone started it).
pub const HIDDEN_CPU_FEATURES: [&str; 2] = ["vmx", "svm"];

/// The `<cpu>` element in `mode`, with `hidden` features disabled.
fn cpu_xml(mode: &str, hidden: &[&str]) -> String {
    let features: String = hidden
        .iter()
        .map(|name| format!("\n    <feature policy='disable' name='{name}'/>"))
        .collect();
    if features.is_empty() {
        return format!("<cpu mode='{mode}' check='none'/>");
    }
    format!("<cpu mode='{mode}' check='none'>{features}\n  </cpu>")
}

/// The XML of a transient builder domain. It carries a `<genid/>` (a VM generation ID,
/// which libvirt renews whenever the domain is restored from a saved state).
///
/// With `emulator` (under `qemu:///session`) libvirt runs the launcher instead of its
/// default QEMU and gives it [`POLICY_ENV`]; without it (`qemu:///system`) libvirt's default
/// emulator runs as its own unprivileged user, and every backing layer carries
/// `<seclabel model='dac' relabel='no'/>`.
///
/// `accel` should already be resolved (see [`crate::accel::resolve`]); `Auto` is written as
/// TCG. Paths are written as given: [`crate::create`] makes them absolute and rejects
/// paths that are not UTF-8 before calling this.
pub fn domain_xml(
    identity: &Identity,
    spec: &VmSpec,
    accel: Accel,
    disks: &Disks,
    owner: &VmOwner,
    socket_dir: Option<&Path>,
    emulator: Option<&Emulator>,
) -> String {
    let name = identity.name;
    let (uuid, genid) = identity_xml(identity);
    let (domain_type, cpu) = match accel {
        Accel::Kvm => ("kvm", cpu_xml("host-passthrough", &HIDDEN_CPU_FEATURES)),
        Accel::Tcg | Accel::Auto => ("qemu", cpu_xml("maximum", &[])),
    };
    let image = &spec.image;
    let initrd = image
        .initrd
        .as_deref()
        .map(|p| format!("\n    <initrd>{}</initrd>", esc_path(p)))
        .unwrap_or_default();
    let process_start = owner
        .process_start
        .map(|s| format!(" process-start='{s}'"))
        .unwrap_or_default();
    let channel = |port: &str| channel_xml(socket_dir, name, port);
    let (qemu_ns, emulator_element, commandline) = emulator_xml(emulator);
    format!(
        "<domain type='{domain_type}'{qemu_ns}>
  <name>{name}</name>{uuid}
  {genid}
  <metadata>
    <contractor:vm xmlns:contractor='{ns}'>
      <contractor:owner pid='{pid}'{process_start} host='{host}' created='{created}'/>
    </contractor:vm>
  </metadata>
  <memory unit='MiB'>{memory}</memory>
  <vcpu placement='static'>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{kernel}</kernel>{initrd}
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{emulator_element}    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file='{overlay}'/>
{overlay_backing}      <target dev='vda' bus='virtio'/>
    </disk>
{build_disk}    <controller type='usb' model='none'/>
    <serial type='null'>
      <log file='{console_log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='null'>
      <target type='serial' port='0'/>
    </console>
{control}{tunnel}    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <memballoon model='none'/>
  </devices>
{commandline}</domain>
",
        name = escape(name),
        machine = MACHINE,
        ns = METADATA_NAMESPACE,
        pid = owner.pid,
        host = escape(&owner.host),
        created = owner.created_unix,
        memory = spec.memory_mib,
        cpus = spec.cpus,
        kernel = esc_path(&image.kernel),
        cmdline = escape(&kernel_cmdline(&image.cmdline, accel)),
        overlay = esc_path(disks.overlay),
        overlay_backing = backing_xml(disks.overlay_backing, 6, emulator.is_none()),
        build_disk = build_disk_xml(disks, emulator.is_none()),
        console_log = esc_path(&spec.console_log),
        control = channel(CONTROL_PORT),
        tunnel = channel(TUNNEL_PORT),
    )
}

/// The `<uuid>` line (when the identity has one) and the `<genid>` element of a domain.
fn identity_xml(identity: &Identity) -> (String, String) {
    let uuid = identity
        .uuid
        .map(|u| format!("\n  <uuid>{}</uuid>", escape(u)))
        .unwrap_or_default();
    let genid = match identity.genid {
        Some(id) => format!("<genid>{}</genid>", escape(id)),
        None => "<genid/>".to_string(),
    };
    (uuid, genid)
}

/// The virtio-serial channel `port` of VM `name`. Without a directory libvirt picks the
/// socket path itself; with one (needed under qemu:///session, whose own paths can pass
/// the 107-byte limit of a socket path) the sockets are `<dir>/<name>.<port>`.
fn channel_xml(socket_dir: Option<&Path>, name: &str, port: &str) -> String {
    let source = match socket_dir {
        Some(dir) => format!(
            "<source mode='bind' path='{}'/>",
            esc_path(&socket_path(dir, name, port))
        ),
        None => "<source mode='bind'/>".to_string(),
    };
    format!(
        "    <channel type='unix'>\n      {source}\n      \
         <target type='virtio' name='{}'/>\n    </channel>\n",
        escape(port)
    )
}

/// With the launcher as emulator: the qemu XML namespace attribute, the `<emulator>`
/// element and the `<qemu:commandline>` that hands it its policy; else three empty strings.
fn emulator_xml(emulator: Option<&Emulator>) -> (String, String, String) {
    match emulator {
        Some(e) => (
            format!(" xmlns:qemu='{QEMU_NAMESPACE}'"),
            format!("    <emulator>{}</emulator>\n", esc_path(e.launcher)),
            format!(
                "  <qemu:commandline>\n    <qemu:env name='{POLICY_ENV}' value='{}'/>\n  \
                 </qemu:commandline>\n",
                escape(&e.policy.to_json())
            ),
        ),
        None => Default::default(),
    }
}

/// The build disk (`vdb`) when there is one, its backing chain unrelabelled when `dac`.
fn build_disk_xml(disks: &Disks, dac: bool) -> String {
    disks.build.map_or(String::new(), |path| {
        format!(
            "    <disk type='file' device='disk'>\n      \
             <driver name='qemu' type='{}' cache='unsafe'/>\n      \
             <source file='{}'/>\n{}      <target dev='vdb' bus='virtio'/>\n    </disk>\n",
            disks.build_format.as_str(),
            esc_path(path),
            backing_xml(disks.build_backing, 6, dac)
        )
    })
}

/// The x86_64 emulator libvirt's capabilities XML names (`<guest><arch name='x86_64'>
/// <emulator>`), if any.
pub fn default_emulator(capabilities: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(capabilities).ok()?;
    let found = doc
        .descendants()
        .filter(|n| n.has_tag_name("arch") && n.attribute("name") == Some("x86_64"))
        .flat_map(|arch| children(arch, "emulator"))
        .find_map(|e| e.text())
        .map(|text| PathBuf::from(text.trim()));
    found
}

/// What a running domain's XML tells about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainFacts {
    /// `kvm` or `tcg`, from the domain type.
    pub accel: Option<Accel>,
    /// The source file of the first disk.
    pub overlay: Option<PathBuf>,
    /// Host end of the control channel.
    pub control_socket: Option<PathBuf>,
    /// Host end of the tunnel channel.
    pub tunnel_socket: Option<PathBuf>,
    /// The owner from Contractor's metadata, when present.
    pub owner: Option<VmOwner>,
    /// The VM generation ID, when the domain has one.
    pub genid: Option<String>,
}

fn children<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    tag: &'static str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    node.children().filter(move |n| n.has_tag_name(tag))
}

/// Reads the facts out of a domain's XML (as returned by `virDomainGetXMLDesc`).
pub fn parse_domain(xml: &str) -> Result<DomainFacts, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(XmlError::Parse)?;
    let root = doc.root_element();
    let mut facts = DomainFacts {
        accel: match root.attribute("type") {
            Some("kvm") => Some(Accel::Kvm),
            Some("qemu") => Some(Accel::Tcg),
            _ => None,
        },
        ..DomainFacts::default()
    };
    facts.genid = children(root, "genid")
        .find_map(|g| g.text())
        .map(|t| t.trim().to_owned());
    for devices in children(root, "devices") {
        if facts.overlay.is_none() {
            facts.overlay = children(devices, "disk")
                .filter(|d| d.attribute("device").unwrap_or("disk") == "disk")
                .flat_map(|d| children(d, "source"))
                .find_map(|s| s.attribute("file"))
                .map(PathBuf::from);
        }
        for channel in children(devices, "channel") {
            let port = children(channel, "target").find_map(|t| t.attribute("name"));
            let path = children(channel, "source")
                .find_map(|s| s.attribute("path"))
                .map(PathBuf::from);
            match port {
                Some(p) if p == CONTROL_PORT => facts.control_socket = path,
                Some(p) if p == TUNNEL_PORT => facts.tunnel_socket = path,
                _ => {}
            }
        }
    }
    facts.owner = root
        .descendants()
        .find(|n| n.has_tag_name((METADATA_NAMESPACE, "owner")))
        .and_then(|owner| {
            let number = |attr: &str| owner.attribute(attr).and_then(|v| v.parse::<u64>().ok());
            Some(VmOwner {
                pid: owner.attribute("pid")?.parse().ok()?,
                process_start: number("process-start"),
                host: owner.attribute("host")?.to_owned(),
                created_unix: number("created").unwrap_or(0),
            })
        });
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_guests_skip_the_timer_check_kvm_guests_keep_the_image_cmdline() {
        assert_eq!(
            kernel_cmdline("console=ttyS0 root=/dev/vda", Accel::Tcg),
            "console=ttyS0 root=/dev/vda no_timer_check"
        );
        assert_eq!(
            kernel_cmdline("a no_timer_check", Accel::Tcg),
            "a no_timer_check"
        );
        assert_eq!(kernel_cmdline("console=ttyS0", Accel::Kvm), "console=ttyS0");
    }
    use contractor_protocol::vm::BootImage;

    fn spec() -> VmSpec {
        VmSpec {
            name: None,
            image: BootImage {
                disk: "/images/base.qcow2".into(),
                kernel: "/images/vmlinuz".into(),
                initrd: Some("/images/initrd.img".into()),
                cmdline: "console=ttyS0 root=/dev/vda rw x=\"<&'>\"".into(),
            },
            cpus: 2,
            memory_mib: 768,
            disk_gib: None,
            accel: Accel::Auto,
            console_log: "/work/it's <here>/console.log".into(),
            work_dir: "/work".into(),
            snapshot: false,
        }
    }

    fn owner() -> VmOwner {
        VmOwner {
            pid: 4242,
            process_start: Some(99),
            host: "h&st".into(),
            created_unix: 7,
        }
    }

    fn xml(accel: Accel) -> String {
        domain_xml(
            &Identity::named("contractor-abc"),
            &spec(),
            accel,
            &Disks {
                overlay: Path::new("/work/contractor-abc.qcow2"),
                overlay_backing: &[],
                build: None,
                build_format: DiskFormat::Raw,
                build_backing: &[],
            },
            &owner(),
            None,
            None,
        )
    }

    /// The TCG domain of `contractor-x` on `disks`.
    fn xml_on(disks: &Disks) -> String {
        domain_xml(
            &Identity::named("contractor-x"),
            &spec(),
            Accel::Tcg,
            disks,
            &owner(),
            None,
            None,
        )
    }

    /// The `<disk>` elements of `doc`, in order.
    fn disks_of<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> Vec<roxmltree::Node<'a, 'i>> {
        doc.descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect()
    }

    #[test]
    fn tcg_domain_has_what_a_builder_needs_and_nothing_else() {
        let text = xml(Accel::Tcg);
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("qemu"));
        let find = |tag: &str| {
            doc.descendants()
                .filter(|n| n.has_tag_name(tag))
                .collect::<Vec<_>>()
        };
        assert_eq!(find("name")[0].text(), Some("contractor-abc"));
        assert_eq!(find("memory")[0].attribute("unit"), Some("MiB"));
        assert_eq!(find("memory")[0].text(), Some("768"));
        assert_eq!(find("vcpu")[0].text(), Some("2"));
        let os_type = find("type")[0];
        assert_eq!(os_type.attribute("machine"), Some("q35"));
        assert_eq!(os_type.attribute("arch"), Some("x86_64"));
        assert_eq!(find("kernel")[0].text(), Some("/images/vmlinuz"));
        assert_eq!(find("initrd")[0].text(), Some("/images/initrd.img"));
        assert_eq!(
            find("cmdline")[0].text(),
            Some("console=ttyS0 root=/dev/vda rw x=\"<&'>\" no_timer_check")
        );
        assert_eq!(find("cpu")[0].attribute("mode"), Some("maximum"));
        for action in ["on_poweroff", "on_reboot", "on_crash"] {
            assert_eq!(find(action)[0].text(), Some("destroy"), "{action}");
        }
        let disks = find("disk");
        assert_eq!(disks.len(), 1, "exactly one disk");
        let driver = find("driver")[0];
        assert_eq!(driver.attribute("type"), Some("qcow2"));
        assert_eq!(driver.attribute("cache"), Some("unsafe"));
        assert_eq!(
            find("target")
                .iter()
                .filter(|t| t.attribute("dev") == Some("vda"))
                .count(),
            1
        );
        for absent in [
            "interface",
            "graphics",
            "sound",
            "video",
            "hostdev",
            "filesystem",
        ] {
            assert!(find(absent).is_empty(), "<{absent}> must not exist");
        }
        assert!(!text.contains("<interface"));
        assert_eq!(find("controller")[0].attribute("model"), Some("none"));
        assert_eq!(find("memballoon")[0].attribute("model"), Some("none"));
        assert_eq!(find("backend")[0].text(), Some("/dev/urandom"));
        let log = find("log")[0];
        assert_eq!(log.attribute("file"), Some("/work/it's <here>/console.log"));
        assert_eq!(log.attribute("append"), Some("off"));
        let ports: Vec<_> = find("channel")
            .iter()
            .map(|c| {
                assert_eq!(c.attribute("type"), Some("unix"));
                c.descendants()
                    .find(|n| n.has_tag_name("target"))
                    .and_then(|t| t.attribute("name"))
            })
            .collect();
        assert_eq!(ports, vec![Some(CONTROL_PORT), Some(TUNNEL_PORT)]);
    }

    #[test]
    fn every_backing_layer_is_spelled_out_and_never_relabelled_and_the_console_has_no_pty() {
        let layers = [
            Layer {
                path: "/snap/root.qcow2".into(),
                format: "qcow2".into(),
            },
            Layer {
                path: "/images/it's/disk.qcow2".into(),
                format: "qcow2".into(),
            },
        ];
        let build = [Layer {
            path: "/snap/disk.raw".into(),
            format: "raw".into(),
        }];
        let text = xml_on(&Disks {
            overlay: Path::new("/w/contractor-x.qcow2"),
            overlay_backing: &layers,
            build: Some(Path::new("/w/contractor-x.disk.qcow2")),
            build_format: DiskFormat::Qcow2,
            build_backing: &build,
        });
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        let disks = disks_of(&doc);
        assert_eq!(disks.len(), 2);
        // Each disk's chain, nearest first: (file, format, relabelled?), then its end.
        let chain = |disk: roxmltree::Node| {
            let mut found = Vec::new();
            let mut node = disk;
            while let Some(store) = node.children().find(|n| n.has_tag_name("backingStore")) {
                let Some(source) = store.children().find(|n| n.has_tag_name("source")) else {
                    assert!(store.children().all(|n| !n.is_element()), "an empty end");
                    return found;
                };
                let format = store
                    .children()
                    .find(|n| n.has_tag_name("format"))
                    .and_then(|f| f.attribute("type"));
                let seclabel = source
                    .children()
                    .find(|n| n.has_tag_name("seclabel"))
                    .expect("a seclabel on every layer");
                assert_eq!(seclabel.attribute("model"), Some("dac"));
                assert_eq!(seclabel.attribute("relabel"), Some("no"));
                found.push((
                    source.attribute("file").map(str::to_owned),
                    format.map(str::to_owned),
                ));
                node = store;
            }
            panic!("the chain has no empty end: {text}")
        };
        let some = |a: &str, b: &str| (Some(a.to_owned()), Some(b.to_owned()));
        assert_eq!(
            chain(disks[0]),
            vec![
                some("/snap/root.qcow2", "qcow2"),
                some("/images/it's/disk.qcow2", "qcow2")
            ]
        );
        assert_eq!(chain(disks[1]), vec![some("/snap/disk.raw", "raw")]);
        // The overlays themselves are QEMU's to write: no seclabel on them.
        for disk in &disks {
            let top = disk
                .children()
                .find(|n| n.has_tag_name("source"))
                .expect("source");
            assert!(top.children().all(|n| !n.has_tag_name("seclabel")));
        }
        // The console: no host end (no pty for QEMU to open), only its log.
        for tag in ["serial", "console"] {
            let node = doc.descendants().find(|n| n.has_tag_name(tag)).expect(tag);
            assert_eq!(node.attribute("type"), Some("null"), "{tag}");
        }
        assert!(!text.contains("pty"), "{text}");
        assert_eq!(
            parse_domain(&text).expect("parse").overlay.as_deref(),
            Some(Path::new("/w/contractor-x.qcow2"))
        );
    }

    #[test]
    fn kvm_domain_passes_the_host_cpu_through() {
        let text = xml(Accel::Kvm);
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        assert_eq!(doc.root_element().attribute("type"), Some("kvm"));
        let cpu = doc
            .descendants()
            .find(|n| n.has_tag_name("cpu"))
            .expect("cpu");
        assert_eq!(cpu.attribute("mode"), Some("host-passthrough"));
    }

    #[test]
    fn under_kvm_the_guest_never_gets_hardware_virtualisation() {
        for (accel, hidden) in [(Accel::Kvm, vec!["vmx", "svm"]), (Accel::Tcg, vec![])] {
            let text = xml(accel);
            let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
            let cpu = doc
                .descendants()
                .find(|n| n.has_tag_name("cpu"))
                .expect("cpu");
            let disabled: Vec<_> = cpu
                .children()
                .filter(|n| n.has_tag_name("feature"))
                .filter(|n| n.attribute("policy") == Some("disable"))
                .filter_map(|n| n.attribute("name"))
                .collect();
            assert_eq!(disabled, hidden, "{accel:?}: {text}");
        }
    }

    #[test]
    fn a_build_disk_is_the_second_disk_raw_as_vdb() {
        let text = xml_on(&Disks {
            overlay: Path::new("/w/contractor-x.qcow2"),
            overlay_backing: &[],
            build: Some(Path::new("/w/contractor-x.disk.raw")),
            build_format: DiskFormat::Raw,
            build_backing: &[],
        });
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        let disks = disks_of(&doc);
        assert_eq!(disks.len(), 2);
        let child = |disk: roxmltree::Node, tag: &str, attr: &str| {
            disk.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.attribute(attr).map(str::to_owned))
        };
        assert_eq!(child(disks[1], "target", "dev").as_deref(), Some("vdb"));
        assert_eq!(child(disks[1], "driver", "type").as_deref(), Some("raw"));
        assert_eq!(
            child(disks[1], "source", "file").as_deref(),
            Some("/w/contractor-x.disk.raw")
        );
        // The overlay is still the disk the VM's facts name.
        assert_eq!(
            parse_domain(&text).expect("parse").overlay.as_deref(),
            Some(Path::new("/w/contractor-x.qcow2"))
        );
    }

    #[test]
    fn no_initrd_means_no_initrd_element() {
        let mut s = spec();
        s.image.initrd = None;
        let text = domain_xml(
            &Identity::named("contractor-x"),
            &s,
            Accel::Tcg,
            &Disks {
                overlay: Path::new("/o.qcow2"),
                overlay_backing: &[],
                build: None,
                build_format: DiskFormat::Raw,
                build_backing: &[],
            },
            &owner(),
            None,
            None,
        );
        assert!(!text.contains("<initrd"));
    }

    #[test]
    fn a_socket_directory_gives_each_channel_a_short_path_there() {
        let text = domain_xml(
            &Identity::named("contractor-x"),
            &spec(),
            Accel::Tcg,
            &Disks {
                overlay: Path::new("/o.qcow2"),
                overlay_backing: &[],
                build: None,
                build_format: DiskFormat::Raw,
                build_backing: &[],
            },
            &owner(),
            Some(Path::new("/tmp/contractor-1000")),
            None,
        );
        let facts = parse_domain(&text).expect("parse");
        assert_eq!(
            facts.control_socket.as_deref(),
            Some(Path::new("/tmp/contractor-1000/contractor-x.control"))
        );
        assert_eq!(
            facts.tunnel_socket.as_deref(),
            Some(Path::new("/tmp/contractor-1000/contractor-x.tunnel"))
        );
    }

    #[test]
    fn written_xml_reads_back() {
        let facts = parse_domain(&xml(Accel::Tcg)).expect("parse");
        assert_eq!(facts.accel, Some(Accel::Tcg));
        assert_eq!(
            facts.overlay,
            Some(PathBuf::from("/work/contractor-abc.qcow2"))
        );
        assert_eq!(facts.owner, Some(owner()));
        assert_eq!(facts.control_socket, None, "libvirt fills the paths in");
    }

    #[test]
    fn live_xml_socket_paths_are_found() {
        // As libvirt 9.0 reports a running domain (abridged).
        let live = "<domain type='qemu' id='3'><name>contractor-abc</name>\
          <metadata><c:vm xmlns:c='https://contractor.invalid/vm/1'>\
          <c:owner pid='12' host='h' created='5'/></c:vm></metadata><devices>\
          <disk type='file' device='disk'><source file='/w/contractor-abc.qcow2' index='1'/>\
          <backingStore type='file' index='2'><format type='qcow2'/>\
          <source file='/images/base.qcow2'/></backingStore><target dev='vda'/></disk>\
          <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-contractor-abc/org.contractor.control'/>\
          <target type='virtio' name='org.contractor.control' state='disconnected'/></channel>\
          <channel type='unix'><source mode='bind' path='/run/t.sock'/>\
          <target type='virtio' name='org.contractor.tunnel'/></channel></devices></domain>";
        let facts = parse_domain(live).expect("parse");
        assert_eq!(
            facts.overlay,
            Some(PathBuf::from("/w/contractor-abc.qcow2"))
        );
        assert_eq!(
            facts.control_socket,
            Some(PathBuf::from(
                "/var/lib/libvirt/qemu/channel/target/domain-3-contractor-abc/org.contractor.control"
            ))
        );
        assert_eq!(facts.tunnel_socket, Some(PathBuf::from("/run/t.sock")));
        let owner = facts.owner.expect("owner");
        assert_eq!(
            (owner.pid, owner.process_start, owner.host.as_str()),
            (12, None, "h")
        );
    }

    fn qemu_policy() -> QemuPolicy {
        use crate::launcher::policy::{WritableFile, POLICY_VERSION};
        QemuPolicy {
            version: POLICY_VERSION,
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            memory_mib: 768,
            image_disk: "/images/base.qcow2".into(),
            kernel: "/images/vmlinuz".into(),
            initrd: Some("/images/initrd.img".into()),
            overlay: WritableFile {
                path: "/work/it's <o>.qcow2".into(),
                max_bytes: 1 << 30,
            },
            build_disk: None,
            backing: Vec::new(),
        }
    }

    #[test]
    fn a_session_domain_runs_the_launcher_and_gives_it_the_policy() {
        let policy = qemu_policy();
        let text = domain_xml(
            &Identity::named("contractor-abc"),
            &spec(),
            Accel::Tcg,
            &Disks {
                overlay: Path::new("/work/it's <o>.qcow2"),
                overlay_backing: &[Layer {
                    path: "/images/base.qcow2".into(),
                    format: "qcow2".into(),
                }],
                build: None,
                build_format: DiskFormat::Raw,
                build_backing: &[],
            },
            &owner(),
            Some(Path::new("/tmp/contractor-1000")),
            Some(&Emulator {
                launcher: Path::new("/opt/c&c/contractor-qemu"),
                policy: &policy,
            }),
        );
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        // The chain is written out, without a DAC seclabel: qemu:///session has no DAC
        // driver and would refuse the domain.
        assert!(
            text.contains("<source file='/images/base.qcow2'></source>"),
            "{text}"
        );
        assert!(!text.contains("seclabel"), "{text}");
        let emulator: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("emulator"))
            .collect();
        assert_eq!(emulator.len(), 1);
        assert_eq!(emulator[0].text(), Some("/opt/c&c/contractor-qemu"));
        assert_eq!(
            emulator[0].parent().map(|p| p.tag_name().name()),
            Some("devices")
        );
        let envs: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name((QEMU_NAMESPACE, "env")))
            .collect();
        assert_eq!(envs.len(), 1);
        assert_eq!(envs[0].attribute("name"), Some(POLICY_ENV));
        let value = envs[0].attribute("value").expect("value");
        assert_eq!(
            QemuPolicy::parse(value).expect("the policy reads back"),
            policy
        );
        assert_eq!(
            envs[0].parent().map(|p| p.tag_name().namespace()),
            Some(Some(QEMU_NAMESPACE))
        );
        // Still exactly one disk, and the facts read back.
        assert_eq!(
            parse_domain(&text).expect("parse").overlay.as_deref(),
            Some(Path::new("/work/it's <o>.qcow2"))
        );
    }

    #[test]
    fn a_system_domain_has_neither_emulator_nor_qemu_commandline() {
        let text = xml(Accel::Tcg);
        for absent in ["<emulator", "qemu:", POLICY_ENV, QEMU_NAMESPACE] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
    }

    #[test]
    fn the_x86_64_emulator_is_read_from_the_capabilities() {
        let caps = "<capabilities><host/>\
          <guest><os_type>hvm</os_type><arch name='i686'><emulator>/usr/bin/qemu-system-i386</emulator></arch></guest>\
          <guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>\
          <emulator>/usr/bin/qemu-system-x86_64</emulator><domain type='qemu'/></arch></guest>\
          </capabilities>";
        assert_eq!(
            default_emulator(caps),
            Some(PathBuf::from("/usr/bin/qemu-system-x86_64"))
        );
        assert_eq!(default_emulator("<capabilities/>"), None);
        assert_eq!(default_emulator("not xml"), None);
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape(r#"a<b>&'c'"d""#),
            "a&lt;b&gt;&amp;&apos;c&apos;&quot;d&quot;"
        );
    }
}
