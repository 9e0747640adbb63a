package exec

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"github.com/moby/sys/user"
	"golang.org/x/sys/unix"
)

// defaultPath is the PATH of a command whose Env has none (the one Docker
// and containerd use).
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// spawner starts processes and reports their wait status.
type spawner interface {
	start(argv0 string, argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error)
}

// Reaper collects the exit status of every child of this process: the
// processes the server starts and the orphans the kernel reparents to PID 1.
// A single loop waits for any child and hands each status to whoever
// started that pid, so an orphan reap can never steal the status of a
// process we are waiting for (which happens when os/exec's per-pid Wait
// races a wait4(-1) loop).
//
// The loop blocks in waitid itself: the kernel wakes it the moment a child
// exits. os/signal is not used for SIGCHLD, so no hand-off between
// goroutines sits between a command's exit and its status: work on every
// command, and every instruction counts under TCG. (The Go runtime's own
// handler still takes each SIGCHLD, with SA_RESTART. SIGCHLD must never
// be ignored, SIG_IGN: the kernel would then reap the children itself and
// their statuses would be lost.)
//
// Only one Reaper may exist per process, and only in a process that owns
// all its children (PID 1, or a child subreaper that uses no os/exec).
type Reaper struct {
	log     *slog.Logger
	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus
	forked  chan struct{} // start forked a child: wakes a loop that had none
	selfAdj string        // this process's oom_score_adj, read at the first start
}

// NewReaper starts reaping all children of the process.
func NewReaper(log *slog.Logger) *Reaper {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Reaper{log: log, waiters: make(map[int]chan syscall.WaitStatus), forked: make(chan struct{}, 1)}
	go r.loop()
	return r
}

// loop reaps children as they exit. With no child at all (ECHILD) the
// loop sleeps until start forks again, or a second has passed: a process
// without children can still be given orphans, as PID 1 is those of the
// kernel's helper programs (modprobe, a core_pattern pipe), which are not
// its descendants; they wait at most that second to be reaped.
//
// A child is only looked at while it exits (waitid with WNOWAIT leaves it
// a zombie); it is reaped, and its status handed on, under r.mu. Its pid
// stays taken until then, so start, which forks under r.mu, cannot be
// given the same pid for a new child meanwhile: reaped outside the lock,
// a pid reused at once (a fork bomb cycles through pid_max quickly) would
// have taken the earlier process's status to the new one's waiter.
//
// How it blocks matters to every exec (see waitChildBlocking): after a
// fork it waits keeping its P, the cheapest way for a short command, which
// then runs from request to answer on one thread; once it has reaped a
// child, whose waiter (and its output, and the host's next request) is
// about to need the P, it first looks without blocking, and blocks only
// when children are left running (a box's background process): then it
// gives the P up as it blocks.
func (r *Reaper) loop() {
	idle := time.NewTimer(time.Second)
	info := new(unix.Siginfo)
	reaped := false
	for {
		*info = unix.Siginfo{}
		var e syscall.Errno
		switch {
		case !reaped:
			e = waitAnyChild(info, 0)
		default:
			if e = waitAnyChild(info, unix.WNOHANG); e == 0 && sigchldPid(info) == 0 {
				*info = unix.Siginfo{}
				e = waitChildBlocking(info)
			}
		}
		var err error
		if e != 0 {
			err = e
		}
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.ECHILD:
			reaped = false
			idle.Reset(time.Second)
			select {
			case <-r.forked:
			case <-idle.C:
			}
			continue
		case err != nil:
			r.log.Warn("waitid", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		pid := sigchldPid(info)
		if pid <= 0 { // wait4 would take any child: never
			r.log.Warn("waitid: no pid", "pid", pid)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		r.mu.Lock()
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		if err != nil || got <= 0 {
			r.mu.Unlock()
			r.log.Warn("wait4", "pid", pid, "got", got, "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		pid = got // the same, short of a kernel that disagrees with itself
		reaped = true
		ch, ok := r.waiters[pid]
		delete(r.waiters, pid)
		r.mu.Unlock()
		if ok {
			ch <- ws
		} else {
			r.log.Debug("reaped orphan", "pid", pid, "status", int(ws))
		}
	}
}

// sigchldPid is si_pid of a siginfo_t that waitid filled in: the first
// field of its union, which follows three ints, aligned to a pointer (16
// bytes in on 64-bit Linux, 12 on 32-bit).
func sigchldPid(info *unix.Siginfo) int {
	b := (*[unsafe.Sizeof(unix.Siginfo{})]byte)(unsafe.Pointer(info))
	const ptr = unsafe.Sizeof(uintptr(0))
	off := (12 + ptr - 1) &^ (ptr - 1)
	return int(int32(binary.NativeEndian.Uint32(b[off:])))
}

// start forks and registers the child under r.mu: the reap loop needs r.mu
// to dispatch, so even a child that exits at once finds its waiter.
func (r *Reaper) start(argv0 string, argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// A child inherits its parent's oom_score_adj at fork. The agent, as
	// PID 1, keeps 0 (the kernel never OOM-kills init), but a process
	// started with a lowered score (a service manager's OOMScoreAdjust)
	// would pass it on, and set on the child once ForkExec returns, 0
	// would come too late: the command runs by then and may have forked.
	// So such a process drops to 0 for the fork and goes back at once.
	if r.selfAdj == "" {
		b, _ := readSmall("/proc/self/oom_score_adj")
		r.selfAdj = strings.TrimSpace(string(b))
	}
	lowered := r.selfAdj != "" && r.selfAdj != "0" && writeSmall("/proc/self/oom_score_adj", "0") == nil
	pid, err := syscall.ForkExec(argv0, argv, attr)
	if lowered {
		if werr := writeSmall("/proc/self/oom_score_adj", r.selfAdj); werr != nil {
			r.log.Warn("restoring the agent's oom_score_adj", "err", werr)
		}
	}
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	r.waiters[pid] = ch
	select {
	case r.forked <- struct{}{}:
	default: // the loop is awake, or will be
	}
	return pid, ch, nil
}

// writeSmall writes s to a proc or cgroup file with bare system calls:
// os.WriteFile's bookkeeping (poller, finalizer) costs a millisecond per
// exec under TCG.
func writeSmall(path, s string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	_, err = unix.Write(fd, []byte(s))
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	return err
}

// readSmall reads up to 512 bytes of a proc or cgroup file, as writeSmall
// writes.
func readSmall(path string) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	buf := make([]byte, 512)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

// pidWaiter waits for each child by pid: for servers that are not PID 1
// (tests, or an agent run as an ordinary process).
type pidWaiter struct{}

func (pidWaiter) start(argv0 string, argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	pid, err := syscall.ForkExec(argv0, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	go func() {
		var ws syscall.WaitStatus
		for {
			_, err := syscall.Wait4(pid, &ws, 0, nil)
			if err != syscall.EINTR {
				break
			}
		}
		ch <- ws
	}()
	return pid, ch, nil
}

// execSpec is a resolved Command, ready for fork/exec.
type execSpec struct {
	path string // executable, as seen inside the box root
	argv []string
	env  []string
	dir  string
	cred *syscall.Credential
	// chroot is the root the command runs in: the box root, or a
	// container's in it (request Root); "" for the real root.
	chroot string
}

// startError is the error of a command that cannot start.
func startError(arg0, format string, args ...any) error {
	return fmt.Errorf("start %q: %s", arg0, fmt.Sprintf(format, args...))
}

// resolveCommand turns a request into an execSpec, looking up the user,
// working directory and executable inside the box root.
func resolveCommand(root *fsroot.Root, req *request) (*execSpec, error) {
	arg0 := req.Args[0]
	dir := req.Dir
	if dir == "" {
		dir = "/"
	}
	if !path.IsAbs(dir) {
		return nil, startError(arg0, "working directory %q is not absolute", dir)
	}
	if dir != "/" { // the root is a directory
		fd, err := root.OpenFile(dir, unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			return nil, startError(arg0, "chdir %s: %v", dir, err)
		}
		unix.Close(fd)
	}

	u, err := lookupUser(root, req.User)
	if err != nil {
		return nil, startError(arg0, "user %q: %v", req.User, err)
	}
	env := req.Env
	pathEnv, hasPath := getenv(env, "PATH")
	if !hasPath {
		pathEnv = defaultPath
		env = append(env[:len(env):len(env)], "PATH="+defaultPath)
	}
	if _, ok := getenv(env, "HOME"); !ok {
		home := u.Home
		if home == "" {
			home = "/"
		}
		env = append(env[:len(env):len(env)], "HOME="+home)
	}
	exe, err := lookPath(root, arg0, pathEnv, dir)
	if err != nil {
		return nil, startError(arg0, "%v", err)
	}
	groups := make([]uint32, len(u.Sgids))
	for i, g := range u.Sgids {
		groups[i] = uint32(g)
	}
	return &execSpec{
		path: exe,
		argv: req.Args,
		env:  env,
		dir:  dir,
		cred: &syscall.Credential{Uid: uint32(u.Uid), Gid: uint32(u.Gid), Groups: groups},
	}, nil
}

func getenv(env []string, key string) (string, bool) {
	for i := len(env) - 1; i >= 0; i-- {
		if v, ok := strings.CutPrefix(env[i], key+"="); ok {
			return v, true
		}
	}
	return "", false
}

// lookupUser resolves an OCI user spec against the box's passwd and group
// files (see parseUser), from users when those files have not changed
// since: reading and parsing them costs milliseconds per exec under TCG,
// most of an exec's own work.
func lookupUser(root *fsroot.Root, spec string) (*user.ExecUser, error) {
	var st unix.Stat_t
	if err := root.Stat(&st); err != nil {
		return parseUser(root, spec)
	}
	// The root's own directory, not only its path: a sub-root released
	// and made again at the same path is another tree.
	key := userKey{root: root.Path(), dev: st.Dev, ino: st.Ino, spec: spec}
	files := [2]fileVersion{statIn(root, "/etc/passwd"), statIn(root, "/etc/group")}
	if u, ok := users.get(key, files); ok {
		return u, nil
	}
	u, err := parseUser(root, spec)
	if err != nil {
		return nil, err
	}
	// Cached only if the files did not change while they were read, and
	// were last changed over a second ago: file times have the kernel
	// tick's granularity, so a same-size rewrite within the tick of an
	// earlier version would not show (git's "racy" files).
	if files == [2]fileVersion{statIn(root, "/etc/passwd"), statIn(root, "/etc/group")} && files[0].settled() && files[1].settledOrMissing() {
		users.put(key, files, u)
	}
	return u, nil
}

// fileVersion tells one version of a file from another: a rewrite, a
// rename over it or a copy-up into the box's disk changes its change time
// (and mostly its inode).
type fileVersion struct {
	dev, ino, size uint64
	mtime, ctime   unix.Timespec
	exists         bool
}

func (f fileVersion) settled() bool {
	return f.exists && time.Since(time.Unix(f.ctime.Unix())) > time.Second && time.Since(time.Unix(f.mtime.Unix())) > time.Second
}

func (f fileVersion) settledOrMissing() bool { return !f.exists || f.settled() }

// statIn identifies the regular file p inside root (the zero fileVersion if
// there is none).
func statIn(root *fsroot.Root, p string) fileVersion {
	fd, err := root.OpenFile(p, unix.O_PATH)
	if err != nil {
		return fileVersion{}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fileVersion{}
	}
	return fileVersion{dev: st.Dev, ino: st.Ino, size: uint64(st.Size), mtime: st.Mtim, ctime: st.Ctim, exists: true}
}

type userKey struct {
	root     string
	dev, ino uint64
	spec     string
}

type userEntry struct {
	files [2]fileVersion // /etc/passwd, /etc/group
	user  *user.ExecUser
}

// userCache holds resolved users; a hit is valid only while both files
// are the versions it was resolved from.
type userCache struct {
	mu   sync.Mutex
	m    map[userKey]userEntry
	hits atomic.Int64 // for tests
}

// maxCachedUsers bounds the cache (users per root, roots per box).
const maxCachedUsers = 64

var users userCache

func (c *userCache) get(k userKey, files [2]fileVersion) (*user.ExecUser, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	if !ok || e.files != files {
		return nil, false
	}
	c.hits.Add(1)
	u := *e.user
	u.Sgids = append([]int(nil), e.user.Sgids...)
	return &u, true
}

// dropRoot forgets the users of the root at path (released).
func (c *userCache) dropRoot(path string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.m {
		if k.root == path {
			delete(c.m, k)
		}
	}
}

func (c *userCache) put(k userKey, files [2]fileVersion, u *user.ExecUser) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxCachedUsers {
		c.m = make(map[userKey]userEntry) // start over: cheaper than LRU, and rare
	}
	cp := *u
	cp.Sgids = append([]int(nil), u.Sgids...)
	c.m[k] = userEntry{files: files, user: &cp}
}

// parseUser resolves an OCI user spec against the box's passwd and group
// files. A numeric uid need not exist in passwd.
func parseUser(root *fsroot.Root, spec string) (*user.ExecUser, error) {
	const limit = 16 << 20
	var passwd, group *bytes.Reader
	if b, err := root.ReadFile("/etc/passwd", limit); err == nil {
		passwd = bytes.NewReader(b)
	}
	if b, err := root.ReadFile("/etc/group", limit); err == nil {
		group = bytes.NewReader(b)
	}
	defaults := &user.ExecUser{Home: "/"}
	// A nil *bytes.Reader in an io.Reader is not a nil io.Reader.
	switch {
	case passwd != nil && group != nil:
		return user.GetExecUser(spec, defaults, passwd, group)
	case passwd != nil:
		return user.GetExecUser(spec, defaults, passwd, nil)
	case group != nil:
		return user.GetExecUser(spec, defaults, nil, group)
	}
	return user.GetExecUser(spec, defaults, nil, nil)
}

// lookPath finds the executable for arg0 inside the box root, like
// exec.LookPath in the box. The returned path is the box's view of it.
func lookPath(root *fsroot.Root, arg0, pathEnv, dir string) (string, error) {
	if strings.Contains(arg0, "/") {
		p := arg0
		if !path.IsAbs(p) {
			p = path.Join(dir, p)
		}
		if err := checkExecutable(root, p); err != nil {
			return "", err
		}
		return arg0, nil
	}
	for _, d := range strings.Split(pathEnv, ":") {
		if d == "" {
			d = "." // POSIX: an empty PATH entry is the working directory
		}
		p := path.Join(d, arg0)
		abs := p
		if !path.IsAbs(abs) {
			abs = path.Join(dir, abs)
		}
		if checkExecutable(root, abs) == nil {
			if !path.IsAbs(p) {
				p = "./" + p
			}
			return p, nil
		}
	}
	return "", fmt.Errorf("executable file not found in $PATH")
}

func checkExecutable(root *fsroot.Root, p string) error {
	fd, err := root.OpenFile(p, unix.O_PATH)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return unix.EISDIR
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0 {
		return unix.EACCES
	}
	return nil
}
