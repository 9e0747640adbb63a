package boxrund

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/boxrun/boxrun"
)

// Main runs the boxrund command (also `boxrun serve`) with args, the
// command line after the program name, and returns its exit code.
//
// Environment: BOXRUN_STATE_DIR (data dir, default ~/.boxrun),
// BOXRUN_TOKEN, BOXRUN_MAX_CPU, BOXRUN_MAX_MEMORY_MB,
// CONTAINERS_REGISTRIES_CONF.
func Main(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("boxrund", flag.ContinueOnError)
	fs.SetOutput(stderr)
	host := fs.String("host", "127.0.0.1", "TCP address to listen on (not loopback: needs --token)")
	port := fs.Int("port", 9090, "TCP port; 0 turns TCP off")
	dataDir := fs.String("data-dir", defaultDataDir(), "data dir: boxes, images, state ($BOXRUN_STATE_DIR)")
	socket := fs.String("socket", "", "Unix socket; '' turns it off (default <data dir>/boxrun.sock)")
	token := fs.String("token", os.Getenv("BOXRUN_TOKEN"), "bearer token required on TCP ($BOXRUN_TOKEN)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	pool := fs.Int("pool", envIntQuiet("BOXRUN_POOL"), "ready boxes kept per image and shape, made ahead of time ($BOXRUN_POOL; 0: none)")
	version := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *version {
		fmt.Fprintln(stderr, "boxrund", Version)
		return 0
	}
	socketSet := false
	fs.Visit(func(f *flag.Flag) { socketSet = socketSet || f.Name == "socket" })
	if !socketSet {
		*socket = filepath.Join(*dataDir, "boxrun.sock")
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintln(stderr, "boxrund: --log-level:", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))

	cfg := boxrun.Config{
		DataDir:        *dataDir,
		RegistriesConf: os.Getenv("CONTAINERS_REGISTRIES_CONF"),
		MaxCPU:         envInt(log, "BOXRUN_MAX_CPU"),
		MaxMemoryMB:    envInt(log, "BOXRUN_MAX_MEMORY_MB"),
		Pool:           *pool,
		Logger:         log,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// The first signal starts the graceful shutdown; from then on the
	// default action is back, so a second Ctrl-C kills the process.
	go func() {
		<-ctx.Done()
		stop()
	}()
	eng, err := boxrun.New(ctx, cfg)
	if err != nil {
		fmt.Fprintln(stderr, "boxrund:", err)
		return 1
	}
	srv, err := Listen(New(eng, Options{Logger: log}), ListenConfig{Socket: *socket, Host: *host, Port: *port, Token: *token})
	if err != nil {
		eng.Close()
		fmt.Fprintln(stderr, "boxrund:", err)
		return 1
	}
	if a := srv.TCPAddr(); a != "" {
		fmt.Fprintf(stderr, "Starting BoxRun server on http://%s\nDashboard: http://%s/ui\n", a, a)
	}
	if s := srv.Socket(); s != "" {
		fmt.Fprintf(stderr, "Listening on unix:%s\n", s)
	}
	code := 0
	if err := srv.Serve(ctx, 10*time.Second); err != nil {
		log.Error("serve", "err", err)
		code = 1
	}
	log.Info("shutting down: stopping boxes (disks kept)")
	if err := eng.Close(); err != nil {
		log.Error("close engine", "err", err)
		code = 1
	}
	return code
}

// defaultDataDir is $BOXRUN_STATE_DIR, else ~/.boxrun (as upstream).
func defaultDataDir() string {
	if d := os.Getenv("BOXRUN_STATE_DIR"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = "/root"
	}
	return filepath.Join(home, ".boxrun")
}

// envInt reads a positive integer; anything else is ignored with a warning
// (the engine then uses the host's figure).
func envInt(log *slog.Logger, name string) int {
	s := os.Getenv(name)
	if s == "" {
		return 0
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		log.Warn("ignoring invalid value", "var", name, "value", s)
		return 0
	}
	return n
}

// envIntQuiet is envInt before the logger exists: an invalid value is 0
// (flag parsing then reports a bad --pool as usual).
func envIntQuiet(name string) int {
	n, err := strconv.Atoi(os.Getenv(name))
	if err != nil || n < 0 {
		return 0
	}
	return n
}
