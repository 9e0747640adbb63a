//go:build unix

package state

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/boxrun/boxrun/errdefs"
)

// lockFile is the engine's own lock in the data dir. It is taken before
// badger is opened, so a second engine is turned away before it touches
// anything, with a message naming the holder. flock locks belong to the
// open file, so a second Open in the same process is turned away too; the
// kernel drops the lock when the holder dies, however it dies.
const lockFile = "boxrun.lock"

func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "state: open lock file %s", path)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			who := "another engine"
			if pid := strings.TrimSpace(string(holder)); pid != "" {
				who += " (pid " + pid + ")"
			}
			return nil, errdefs.New(errdefs.RuntimeError,
				"state: data dir %s is in use by %s; stop it or use another data dir", dir, who)
		}
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "state: lock %s", path)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

func unlockDir(f *os.File) {
	if f == nil {
		return
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	_ = f.Close()
}
