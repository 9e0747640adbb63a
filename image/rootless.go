package image

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
)

// rootlessWrap makes containers/storage's chrooting children work for an
// ordinary user. Storage re-executes this program as "storage-applyLayer"
// (or -untar, -tar) to unpack a layer inside a chroot, which takes
// CAP_SYS_ADMIN or CAP_SYS_CHROOT. Not root, that child runs the program
// once more in a user namespace of its own where the caller is root (the
// one id the caller has, mapped to 0: no subordinate ids, no setuid
// helper), and the storage routine runs there. Chowns to other ids fail
// there as they would outside, and storage ignores them
// (ignore_chown_errors, see openStorage). It returns only when it did not
// wrap.
func rootlessWrap() {
	switch os.Args[0] {
	case "storage-applyLayer", "storage-untar", "storage-tar":
	default:
		return
	}
	if os.Geteuid() == 0 || os.Getenv(rootlessWrapped) != "" {
		return
	}
	self, err := os.Executable()
	if err != nil {
		self = "/proc/self/exe"
	}
	// The unpacker skips device nodes in a user namespace (it cannot make
	// them there): say it is in one. The base disk makes them (Owners).
	env := os.Environ()
	for i, kv := range env {
		if opt, ok := strings.CutPrefix(kv, "OPT="); ok {
			var o map[string]any
			if json.Unmarshal([]byte(opt), &o) == nil && o != nil {
				o["InUserNS"] = true
				if b, err := json.Marshal(o); err == nil {
					env[i] = "OPT=" + string(b)
				}
			}
		}
	}
	cmd := &exec.Cmd{
		Path:        self,
		Args:        os.Args,
		Env:         append(env, rootlessWrapped+"=1"),
		Stdin:       os.Stdin,
		Stdout:      os.Stdout,
		Stderr:      os.Stderr,
		SysProcAttr: userNSAttr(syscall.SIGTERM),
	}
	err = cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		os.Exit(0)
	case errors.As(err, &exit):
		os.Exit(exit.ExitCode())
	default:
		os.Stderr.WriteString("boxrun: running the layer unpacker in a user namespace: " + err.Error() +
			" (an ordinary user needs unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1)\n")
		os.Exit(1)
	}
}

const rootlessWrapped = "BOXRUN_STORAGE_USERNS"
