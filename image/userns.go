package image

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/containers/image/v5/docker/reference"
	istorage "github.com/containers/image/v5/storage"
	"github.com/containers/image/v5/transports"
	"github.com/containers/image/v5/types"
)

// An ordinary user's pulls run in a child process in a user namespace of
// its own, where the user is root (its one id mapped to 0: no subordinate
// ids, no setuid helper): containers/storage then unpacks and copies
// layers as it does for root, with the CAP_DAC_OVERRIDE of that namespace
// over the user's own files (a layer with a read-only directory, which
// the vfs driver copies into the next layer), and chowns to ids other than
// the image's root, which the namespace does not have, are ignored
// (ignore_chown_errors). The owners the files should have come from the
// layers' tar headers instead (Owners, for the base disk). The parent
// keeps the same store open and sees the pulled image when the child is
// done (containers/storage reloads what another process wrote).

// pullHelper is the child's argv[0] (see init).
const pullHelper = "boxrun-image-pull"

const pullJobEnv = "BOXRUN_PULL_JOB"

type pullJob struct {
	Root, RunRoot  string
	RegistriesConf string
	Ref            string // for progress and logs
	Src            string // transports.ImageName of the source
	DstName        string // the destination's name, if any
	DstID          string // the destination's image id, if any
	Progress       bool
	Owners         string // instead of a pull: the owners of this image (Owners)
}

// pullMsg is a line the child writes on its stdout.
type pullMsg struct {
	Progress *Progress        `json:",omitempty"`
	Done     bool             `json:",omitempty"`
	Error    string           `json:",omitempty"`
	Owners   map[string]Owner `json:",omitempty"`
}

// rootless reports whether this Store belongs to an ordinary user.
func (s *Store) rootless() bool {
	return os.Geteuid() != 0 && s.store.GraphDriverName() == "vfs"
}

func (s *Store) copyInUserNS(ctx context.Context, ref string, src types.ImageReference, named reference.Named, id string) error {
	job := pullJob{Ref: ref, Src: transports.ImageName(src), DstID: id}
	if named != nil {
		job.DstName = named.String()
	}
	fn := s.progressFor(ctx)
	job.Progress = fn != nil
	s.log.Info("pulling image in a user namespace", "ref", ref, "source", job.Src)
	_, err := s.inUserNS(ctx, job, fn)
	return err
}

// ownersInUserNS is Owners for an ordinary user: reading a lower layer's
// tar stream opens its files, and one its owner may not read (a 0000
// /etc/shadow) is readable in the user namespace only.
func (s *Store) ownersInUserNS(ctx context.Context, imageID string) (map[string]Owner, error) {
	return s.inUserNS(ctx, pullJob{Owners: imageID}, nil)
}

// inUserNS runs job in a child in a user namespace and returns its result.
func (s *Store) inUserNS(ctx context.Context, job pullJob, fn func(Progress)) (map[string]Owner, error) {
	job.Root, job.RunRoot, job.RegistriesConf = s.store.GraphRoot(), s.store.RunRoot(), s.sys.SystemRegistriesConfPath
	b, err := json.Marshal(job)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		self = "/proc/self/exe"
	}
	cmd := exec.CommandContext(ctx, self)
	cmd.Args = []string{pullHelper}
	cmd.Env = append(os.Environ(), pullJobEnv+"="+string(b))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = userNSAttr(syscall.SIGKILL)
	// Canceled: SIGTERM, so that the child stops the copy and lets
	// storage remove the half-made layer (in the namespace, where it
	// can), then SIGKILL if it takes too long.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 20 * time.Second
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("run in a user namespace (an ordinary user needs unprivileged user namespaces): %w", err)
	}
	var result *pullMsg
	dec := json.NewDecoder(bufio.NewReaderSize(out, 64<<10))
	for {
		var m pullMsg
		if err := dec.Decode(&m); err != nil {
			break
		}
		switch {
		case m.Progress != nil && fn != nil:
			fn(*m.Progress)
		case m.Done:
			result = &m
		}
	}
	io.Copy(io.Discard, out)
	werr := cmd.Wait()
	switch {
	case result != nil && result.Error != "":
		return nil, errors.New(result.Error)
	case result != nil && werr == nil:
		return result.Owners, nil
	case ctx.Err() != nil:
		return nil, ctx.Err()
	case werr != nil:
		return nil, fmt.Errorf("user namespace child: %w", werr)
	}
	return nil, errors.New("user namespace child: no result")
}

// userNSAttr starts a child in a user namespace of its own where the
// caller's one id is root (no subordinate ids needed), killed with sig
// when the caller dies.
func userNSAttr(sig syscall.Signal) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}},
		Pdeathsig:   sig,
	}
}

// runPullHelper is the child: it pulls the job into the store and says
// how it went on stdout.
func runPullHelper() {
	enc := json.NewEncoder(os.Stdout)
	fail := func(err error) {
		enc.Encode(pullMsg{Done: true, Error: err.Error()})
		os.Exit(0)
	}
	var job pullJob
	if err := json.Unmarshal([]byte(os.Getenv(pullJobEnv)), &job); err != nil {
		fail(fmt.Errorf("bad pull job: %w", err))
	}
	opts := Options{Root: job.Root, RunRoot: job.RunRoot, Driver: "vfs", RegistriesConf: job.RegistriesConf, userNSChild: true,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	if job.Progress {
		opts.Progress = func(p Progress) { enc.Encode(pullMsg{Progress: &p}) }
	}
	s, err := Open(opts)
	if err != nil {
		fail(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if job.Owners != "" {
		owners, err := s.Owners(ctx, job.Owners)
		s.Close()
		if err != nil {
			fail(err)
		}
		enc.Encode(pullMsg{Done: true, Owners: owners})
		os.Exit(0)
	}
	// transports.ImageName's form: "docker://host/repo:tag", "oci:/dir:tag".
	tname, rest, _ := strings.Cut(job.Src, ":")
	t := transports.Get(tname)
	if t == nil {
		s.Close()
		fail(fmt.Errorf("unknown transport in %q", job.Src))
	}
	src, err := t.ParseReference(rest)
	if err != nil {
		s.Close()
		fail(err)
	}
	var named reference.Named
	if job.DstName != "" {
		if named, err = reference.ParseNormalizedNamed(job.DstName); err != nil {
			s.Close()
			fail(err)
		}
	}
	dst, err := istorage.Transport.NewStoreReference(s.store, named, job.DstID)
	if err != nil {
		s.Close()
		fail(err)
	}
	err = s.copyHere(ctx, job.Ref, src, dst)
	s.Close() // also removes a layer left incomplete by a failure
	if err != nil {
		fail(err)
	}
	enc.Encode(pullMsg{Done: true})
	os.Exit(0)
}
