package image

import (
	"context"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/sirupsen/logrus"
)

// containers/image and containers/storage log through logrus's global
// logger, which prints to stderr. A library must not print, so while
// logrus still has its default output, its entries are sent to the logger
// of the most recently opened Store instead. A program that set up logrus
// itself keeps its own setup.
var (
	logrusTarget atomic.Pointer[slog.Logger]
	logrusOnce   sync.Once
)

func routeLogrus(log *slog.Logger) {
	logrusTarget.Store(log)
	logrusOnce.Do(func() {
		std := logrus.StandardLogger()
		if std.Out != os.Stderr {
			return
		}
		std.SetOutput(io.Discard)
		std.AddHook(slogHook{})
	})
}

type slogHook struct{}

func (slogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (slogHook) Fire(e *logrus.Entry) error {
	log := logrusTarget.Load()
	if log == nil {
		return nil
	}
	level := slog.LevelDebug
	switch {
	case e.Level <= logrus.ErrorLevel:
		level = slog.LevelError
	case e.Level == logrus.WarnLevel:
		level = slog.LevelWarn
	case e.Level == logrus.InfoLevel:
		level = slog.LevelInfo
	}
	attrs := make([]any, 0, 2*len(e.Data)+2)
	attrs = append(attrs, "source", "containers")
	for k, v := range e.Data {
		attrs = append(attrs, k, v)
	}
	log.Log(context.Background(), level, e.Message, attrs...)
	return nil
}
