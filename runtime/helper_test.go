package runtime

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	helperActionEnv = "BULKHEAD_SYSMON_HELPER"
	helperNetnsEnv  = "BULKHEAD_SYSMON_NETNS"
	helperCountEnv  = "BULKHEAD_SYSMON_COUNT"
	helperCgroupEnv = "BULKHEAD_SYSMON_CGROUP"
	// helperPathEnv is the unix socket connect-unix connects to.
	helperPathEnv = "BULKHEAD_SYSMON_PATH"
	// helperExpectEnv is the outcome the helper must see: "ok" or "eperm".
	helperExpectEnv = "BULKHEAD_SYSMON_EXPECT"
	// helperEnteredEnv marks the helper exec'd again inside the pod's
	// netns (and cgroup); helperSetupEnv keeps it from exec'ing, so that it
	// acts as a container runtime's set-up does.
	helperEnteredEnv = "BULKHEAD_SYSMON_ENTERED"
	helperSetupEnv   = "BULKHEAD_SYSMON_SETUP"
)

// helper runs the test binary as a process that enters the network
// namespace at nsPath and performs action there, as a compromised pod
// would. It returns the PIDs the helper reports on stdout (the helper's own
// first, then any child it made the syscall from).
func helper(t testing.TB, action, nsPath string, extraEnv ...string) []int {
	t.Helper()
	pids, stderr, err := helperRun(t, action, nsPath, extraEnv...)
	if err != nil {
		t.Fatalf("helper %s: %v: %s", action, err, stderr)
	}
	return pids
}

// helperRun is helper for a run that may end badly (killed): it returns the
// PIDs printed before the end, its stderr, and the process's error.
func helperRun(t testing.TB, action, nsPath string, extraEnv ...string) ([]int, string, error) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperActionEnv+"="+action, helperNetnsEnv+"="+nsPath)
	cmd.Env = append(cmd.Env, extraEnv...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, runErr := cmd.Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		p, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("helper %s printed %q", action, out)
		}
		pids = append(pids, p)
	}
	if len(pids) == 0 {
		t.Fatalf("helper %s printed no pid (%v): %s", action, runErr, stderr.String())
	}
	return pids, stderr.String(), runErr
}

// expect checks an operation's outcome against helperExpectEnv: "ok"
// wants success, "eperm" wants EPERM.
func expect(what string, err error) error {
	switch want := os.Getenv(helperExpectEnv); want {
	case "ok":
		if err != nil {
			return fmt.Errorf("%s: %w, want success", what, err)
		}
	case "eperm":
		if !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%s: %v, want EPERM", what, err)
		}
	default:
		return fmt.Errorf("%s=%q: want ok or eperm", helperExpectEnv, want)
	}
	return nil
}

// runHelper is the helper process's main. Its thread stays locked and is
// never unlocked: its namespaces differ from the rest of the process, so
// the Go runtime must not reuse it.
func runHelper(action, nsPath string) error {
	goruntime.LockOSThread()
	if os.Getenv(helperEnteredEnv) == "" {
		if cg := os.Getenv(helperCgroupEnv); cg != "" {
			if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte("0"), 0); err != nil {
				return fmt.Errorf("join cgroup %s: %w", cg, err)
			}
		}
		fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", nsPath, err)
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns %s: %w", nsPath, err)
		}
		unix.Close(fd)
		// A process that joined the pod from outside is the runtime's
		// set-up until it execs (sysmon_entering): exec again, as a
		// pod's program, unless the test wants the set-up itself.
		if os.Getenv(helperSetupEnv) == "" {
			// By /proc/self/exe: the test binary lives under /tmp,
			// whose execs are a rule of their own (BH-RT-013).
			return unix.Exec("/proc/self/exe", os.Args, append(os.Environ(), helperEnteredEnv+"=1"))
		}
	}
	fmt.Println(os.Getpid())
	switch action {
	case "setns-host":
		// nsenter -t <host process> -n: the parent (the test) is in the
		// node's network namespace.
		host, err := unix.Open(fmt.Sprintf("/proc/%d/ns/net", os.Getppid()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(host)
		return unix.Setns(host, unix.CLONE_NEWNET)
	case "unshare-user":
		// A child forked from this thread (so in the pod's netns) calls
		// unshare(CLONE_NEWUSER) before it execs.
		cmd := exec.Command("/bin/true")
		cmd.SysProcAttr = &unix.SysProcAttr{Unshareflags: unix.CLONE_NEWUSER}
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("unshare -U child: %w", err)
		}
		fmt.Println(cmd.Process.Pid)
		return nil
	case "sh-unshare":
		// A shell in the pod runs unshare(1): exec events give the alert
		// its process and ancestry.
		cmd := exec.Command("sh", "-c", "unshare -U /bin/true; exit 0")
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("sh -c unshare: %w", err)
		}
		fmt.Println(cmd.Process.Pid)
		return nil
	case "mount-tmpfs":
		// A throwaway mount namespace, private, so nothing reaches the host.
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("unshare mount ns: %w", err)
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("make / private: %w", err)
		}
		dir, err := os.MkdirTemp("", "bulkhead-sysmon-mnt-")
		if err != nil {
			return err
		}
		defer os.Remove(dir)
		if err := unix.Mount("bulkhead-test", dir, "tmpfs", 0, "size=64k"); err != nil {
			return fmt.Errorf("mount tmpfs: %w", err)
		}
		fmt.Fprintln(os.Stderr, "mounted at", dir)
		return unix.Unmount(dir, 0)
	case "ptrace":
		child := exec.Command("sleep", "30")
		if err := child.Start(); err != nil {
			return err
		}
		defer func() { child.Process.Kill(); child.Wait() }()
		pid := child.Process.Pid
		fmt.Println(pid)
		if err := unix.PtraceAttach(pid); err != nil {
			return fmt.Errorf("ptrace attach %d: %w", pid, err)
		}
		var ws unix.WaitStatus
		if _, err := unix.Wait4(pid, &ws, unix.WALL, nil); err != nil {
			return fmt.Errorf("wait for tracee: %w", err)
		}
		return unix.PtraceDetach(pid)
	case "bpf":
		// BPF_MAP_CREATE with no attributes: the kernel refuses it, and the
		// attempt is what counts.
		_, _, errno := unix.Syscall(unix.SYS_BPF, 0, 0, 0)
		if errno == 0 {
			return errors.New("bpf(BPF_MAP_CREATE, NULL, 0) succeeded")
		}
		return nil
	case "finit-module":
		// A bogus module image: finit_module fails (ENOSYS on a kernel
		// without module support, ENOEXEC or EPERM elsewhere).
		mfd, err := unix.MemfdCreate("bulkhead-bogus-module", unix.MFD_CLOEXEC)
		if err != nil {
			return err
		}
		defer unix.Close(mfd)
		if _, err := unix.Write(mfd, []byte("not an ELF module")); err != nil {
			return err
		}
		if err := unix.FinitModule(mfd, "", 0); err == nil {
			return errors.New("finit_module of a bogus image succeeded")
		}
		return nil
	case "connect-unix":
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		path := os.Getenv(helperPathEnv)
		return expect("connect "+path, unix.Connect(fd, &unix.SockaddrUnix{Name: path}))
	case "open-path":
		// The path need not exist: the tracepoint sees the attempt.
		fd, err := unix.Open(os.Getenv(helperPathEnv), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			unix.Close(fd)
		}
		return nil
	case "connect-tcp":
		ap, err := netip.ParseAddrPort(os.Getenv(helperPathEnv))
		if err != nil {
			return err
		}
		family := unix.AF_INET6
		var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
		if ap.Addr().Is4() {
			family, sa = unix.AF_INET, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
		}
		fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return expect("connect "+ap.String(), unix.Connect(fd, sa))
	case "raw-socket", "packet-socket":
		family, proto := unix.AF_INET, unix.IPPROTO_ICMP
		if action == "packet-socket" {
			family, proto = unix.AF_PACKET, int(htons(unix.ETH_P_ALL))
		}
		fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err == nil {
			unix.Close(fd)
		}
		return expect(action, err)
	case "sysctl-write":
		// tcp_fin_timeout is per network namespace: this writes the pod's
		// (the test's throwaway netns), never the host's.
		const name = "/proc/sys/net/ipv4/tcp_fin_timeout"
		old, err := os.ReadFile(name)
		if err != nil {
			return err
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(old)))
		if err != nil {
			return err
		}
		f, err := os.OpenFile(name, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		_, werr := f.WriteString(strconv.Itoa(n+1) + "\n")
		f.Close()
		if err := expect("write "+name, werr); err != nil {
			return err
		}
		now, err := os.ReadFile(name)
		if err != nil {
			return err
		}
		if changed := string(now) != string(old); changed != (werr == nil) {
			return fmt.Errorf("%s: %q before, %q after a write that returned %v", name, old, now, werr)
		}
		return nil
	case "chroot":
		// The helper is a throwaway process: its root changes, nothing
		// else's does.
		return unix.Chroot(os.Getenv(helperPathEnv))
	case "pivot-root":
		// In a mount namespace of this thread's own, private: new_root is
		// no mount point, so pivot_root fails (EINVAL) and the attempt is
		// what counts.
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("unshare mount ns: %w", err)
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("make / private: %w", err)
		}
		dir := os.Getenv(helperPathEnv)
		err := unix.PivotRoot(dir, dir)
		fmt.Fprintln(os.Stderr, "pivot_root:", err)
		return nil
	case "memfd-exec":
		// A copy of /bin/true in a memfd, run as /proc/self/fd/3: the
		// executable has no name on any file system.
		bin, err := os.ReadFile("/bin/true")
		if err != nil {
			return err
		}
		mfd, err := unix.MemfdCreate("bulkhead-fileless", unix.MFD_CLOEXEC)
		if err != nil {
			return err
		}
		f := os.NewFile(uintptr(mfd), "memfd")
		defer f.Close()
		if _, err := f.Write(bin); err != nil {
			return err
		}
		cmd := exec.Command("/proc/self/fd/3")
		cmd.ExtraFiles = []*os.File{f}
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("exec memfd: %w", err)
		}
		fmt.Println(cmd.Process.Pid)
		return nil
	case "dir-exec":
		// A copy of /bin/true in the folder at helperPathEnv, run from there.
		bin, err := os.ReadFile("/bin/true")
		if err != nil {
			return err
		}
		exe := filepath.Join(os.Getenv(helperPathEnv), "payload")
		if err := os.WriteFile(exe, bin, 0o700); err != nil {
			return err
		}
		defer os.Remove(exe)
		cmd := exec.Command(exe)
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("exec %s: %w", exe, err)
		}
		fmt.Println(cmd.Process.Pid)
		return nil
	case "reverse-shell", "reverse-shell-tcp":
		// A shell whose stdin (a socketpair) or stdout (a loopback TCP
		// connection) is a socket, as "sh -i <&3" or "bash -i >&
		// /dev/tcp/..." make it.
		cmd := exec.Command("sh", "-c", "exit 0")
		var peer io.Closer
		if action == "reverse-shell" {
			sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			in := os.NewFile(uintptr(sp[0]), "socketpair")
			defer in.Close()
			peer = os.NewFile(uintptr(sp[1]), "socketpair-peer")
			cmd.Stdin = in
		} else {
			// The pod's loopback (a fresh netns has it down).
			lo, err := netlink.LinkByName("lo")
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(lo); err != nil {
				return err
			}
			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				return err
			}
			defer ln.Close()
			c, err := net.Dial("tcp4", ln.Addr().String())
			if err != nil {
				return err
			}
			defer c.Close()
			out, err := c.(*net.TCPConn).File()
			if err != nil {
				return err
			}
			defer out.Close()
			peer = ln
			cmd.Stdout = out
		}
		defer peer.Close()
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("sh with a socket: %w", err)
		}
		fmt.Println(cmd.Process.Pid)
		return nil
	case "benign-exec":
		// Ordinary execs: binaries from /usr/bin, and shells whose stdio
		// are pipes.
		for _, argv := range [][]string{{"/usr/bin/true"}, {"/usr/bin/env", "true"}, {"sh", "-c", "true"}, {"sh", "-c", "/usr/bin/true"}} {
			cmd := exec.Command(argv[0], argv[1:]...)
			cmd.Stdin = strings.NewReader("input") // a pipe
			var out strings.Builder
			cmd.Stdout = &out // a pipe
			if err := cmd.Run(); err != nil {
				return fmt.Errorf("%q: %w", argv, err)
			}
			fmt.Println(cmd.Process.Pid)
		}
		// A pod with a user namespace: its root (uid 100000 on the node)
		// sets its uids to 0, its own root. setpriv calls setresuid(0, 0, -1).
		cmd := exec.Command("/usr/bin/setpriv", "--reuid=0", "/usr/bin/true")
		cmd.SysProcAttr = &unix.SysProcAttr{
			Cloneflags:  unix.CLONE_NEWUSER,
			UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 1}},
			GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 1}},
			Credential:  &syscall.Credential{Uid: 0, Gid: 0},
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("setpriv in a user namespace: %w", err)
		}
		fmt.Println(cmd.Process.Pid)
		// Root asking for root, and root's capset of what it holds: no
		// elevation.
		if _, _, errno := unix.RawSyscall(unix.SYS_SETUID, 0, 0, 0); errno != 0 {
			return fmt.Errorf("setuid(0) as root: %w", errno)
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			return err
		}
		return unix.Capset(&hdr, &data[0])
	case "setuid-root", "capset":
		// This thread (only: a raw syscall) drops to nobody, which clears
		// its capabilities, then asks for root back: EPERM, and the attempt
		// is what counts. The helper exits right after.
		if _, _, errno := unix.RawSyscall(unix.SYS_SETRESUID, 65534, 65534, 65534); errno != 0 {
			return fmt.Errorf("drop to uid 65534: %w", errno)
		}
		var err error
		if action == "setuid-root" {
			_, _, errno := unix.RawSyscall(unix.SYS_SETUID, 0, 0, 0)
			if errno != 0 {
				err = errno
			}
		} else {
			hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
			data := [2]unix.CapUserData{{Effective: 1 << unix.CAP_SYS_ADMIN, Permitted: 1 << unix.CAP_SYS_ADMIN}}
			err = unix.Capset(&hdr, &data[0])
		}
		if !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%s as uid 65534: %v, want EPERM", action, err)
		}
		return nil
	case "unshare-noop":
		n, err := strconv.Atoi(os.Getenv(helperCountEnv))
		if err != nil {
			return err
		}
		for range n {
			// unshare(0) changes nothing; the hook still runs.
			if err := unix.Unshare(0); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("unknown action %q", action)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
