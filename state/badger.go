package state

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"

	"github.com/boxrun/boxrun/errdefs"
)

// Key layout (ids never contain NUL; checkID enforces it):
//
//	v                      schema version (decimal text)
//	b/<boxid>              Box JSON
//	n/<name>               box id owning the name
//	x/<execid>             Exec JSON (retention counters zeroed)
//	m/<execid>             stream bookkeeping (binary, see encodeMeta): next/first seq, stored log totals, drop counters
//	i/<boxid>\0<execid>    "" (index of a box's execs)
//	e/<execid>\0<seq:8 BE> event (binary, see encodeEvent)
//	gb/<boxid>             "" box deleted, its execs not yet purged
//	gx/<execid>            first seq (decimal): exec deleted, its events not yet swept
//
// Box and exec records are JSON; events are binary so that raw output bytes
// (not always valid UTF-8) round-trip exactly.
const (
	keyVersion    = "v"
	pBox          = "b/"
	pName         = "n/"
	pExec         = "x/"
	pMeta         = "m/"
	pBoxExec      = "i/"
	pEvent        = "e/"
	pGoneBox      = "gb/"
	pGoneExec     = "gx/"
	schemaVersion = "1"
)

const (
	// eventSyncInterval bounds how much event output an OS crash or power
	// loss can lose (records are synced on every write; see Open).
	eventSyncInterval = time.Second
	// vlogGCInterval is how often the value log is garbage-collected.
	vlogGCInterval = 5 * time.Minute
	// maxDropsPerTxn keeps an append's transaction well under badger's
	// per-transaction limits; further drops go in follow-up transactions.
	maxDropsPerTxn = 1000
	// purgeBatch is how many execs / events one cleanup transaction removes.
	purgeBatch = 256
	// maxConflictRetries bounds retries of a transaction that lost a race.
	maxConflictRetries = 1000
)

func boxKey(id string) []byte         { return []byte(pBox + id) }
func nameKey(name string) []byte      { return []byte(pName + name) }
func execKey(id string) []byte        { return []byte(pExec + id) }
func metaKey(id string) []byte        { return []byte(pMeta + id) }
func goneBoxKey(id string) []byte     { return []byte(pGoneBox + id) }
func goneExecKey(id string) []byte    { return []byte(pGoneExec + id) }
func boxExecPrefix(box string) []byte { return []byte(pBoxExec + box + "\x00") }
func boxExecKey(box, x string) []byte { return []byte(pBoxExec + box + "\x00" + x) }
func eventPrefix(x string) []byte     { return []byte(pEvent + x + "\x00") }

func eventKey(x string, seq int) []byte {
	k := eventPrefix(x)
	return binary.BigEndian.AppendUint64(k, uint64(seq))
}

func seqOfKey(k []byte) int {
	return int(binary.BigEndian.Uint64(k[len(k)-8:]))
}

// Badger is the durable Store, in a badger database in one directory.
//
// Durability: box records (PutBox, DeleteBox) are synced to disk before
// the call returns. Exec records and events are written without a sync each
// (an exec changes at its start and end, events are high-rate) and synced
// in the background at least every second; a committed write lives in the
// page cache, so it survives the process being killed (SIGKILL, panic) and
// is lost only if the OS itself crashes or loses power within that second.
type Badger struct {
	db   *badger.DB
	dir  string
	lock *os.File
	pol  policy
	log  *slog.Logger

	mu     sync.RWMutex // held shared by operations, exclusively by Close
	closed bool

	dirty atomic.Bool // events written since the last sync
	stop  chan struct{}
	wg    sync.WaitGroup

	work atomic.Int64 // events examined by retention (tests)
}

// Open opens (creating it with mode 0700 if needed) the store in dir. Only
// one store may have dir open at a time, in this process or any other: a
// second Open fails fast with a RUNTIME_ERROR saying the data dir is in use
// by another engine, and leaves the data alone.
func Open(dir string, opts Options) (*Badger, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "state: create data dir %s", dir)
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	bo := badger.DefaultOptions(dir).
		// Small footprint: this runs inside a library on small hosts.
		WithMemTableSize(4 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithBaseTableSize(2 << 20).
		WithBaseLevelSize(8 << 20).
		WithBlockCacheSize(8 << 20).
		WithIndexCacheSize(4 << 20).
		WithValueLogFileSize(16 << 20).
		// Values up to 64 KiB (all records, ordinary output chunks) live in
		// the LSM tree, where compaction reclaims dropped events; larger
		// ones go to the value log, reclaimed by the periodic value log GC.
		WithValueThreshold(64 << 10).
		WithNumCompactors(2).
		WithNumGoroutines(2).
		WithMetricsEnabled(false).
		WithCompression(options.Snappy).
		WithSyncWrites(false). // see the type's comment: records are synced explicitly
		WithDetectConflicts(true).
		WithLogger(badgerLogger{log})
	db, err := badger.Open(bo)
	if err != nil {
		unlockDir(lock)
		if strings.Contains(err.Error(), "Cannot acquire directory lock") {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "state: data dir %s is in use by another engine", dir)
		}
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "state: open data dir %s", dir)
	}
	b := &Badger{db: db, dir: dir, lock: lock, pol: newPolicy(opts), log: log, stop: make(chan struct{})}
	if err := b.checkVersion(); err != nil {
		_ = db.Close()
		unlockDir(lock)
		return nil, err
	}
	// Finish deletions a crash interrupted.
	if err := b.recover(); err != nil {
		_ = db.Close()
		unlockDir(lock)
		return nil, err
	}
	b.wg.Add(2)
	go b.syncLoop()
	go b.gcLoop()
	return b, nil
}

func (b *Badger) checkVersion() error {
	var v []byte
	err := b.db.Update(func(txn *badger.Txn) error {
		it, err := txn.Get([]byte(keyVersion))
		if errors.Is(err, badger.ErrKeyNotFound) {
			v = []byte(schemaVersion)
			return txn.Set([]byte(keyVersion), v)
		}
		if err != nil {
			return err
		}
		v, err = it.ValueCopy(nil)
		return err
	})
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "state: read schema version in %s", b.dir)
	}
	if string(v) != schemaVersion {
		return errdefs.New(errdefs.RuntimeError, "state: data dir %s has schema version %q, this engine reads %q", b.dir, v, schemaVersion)
	}
	return nil
}

// Close syncs and closes the database and releases the data dir. It is safe
// to call more than once; every other call after Close fails.
func (b *Badger) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	close(b.stop)
	b.mu.Unlock()
	b.wg.Wait()
	err := b.db.Close()
	unlockDir(b.lock)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "state: close data dir %s", b.dir)
	}
	return nil
}

// begin guards an operation against a concurrent Close.
func (b *Badger) begin() error {
	b.mu.RLock()
	if b.closed {
		b.mu.RUnlock()
		return errdefs.New(errdefs.RuntimeError, "state: store %s is closed", b.dir)
	}
	return nil
}

func (b *Badger) end() { b.mu.RUnlock() }

// update runs fn in a read-write transaction, retrying when it lost a race
// with another transaction (badger's optimistic conflict detection).
func (b *Badger) update(fn func(txn *badger.Txn) error) error {
	for i := 0; ; i++ {
		err := b.db.Update(fn)
		if errors.Is(err, badger.ErrConflict) && i < maxConflictRetries {
			continue
		}
		return err
	}
}

// sync makes committed writes durable.
func (b *Badger) sync() error {
	if err := b.db.Sync(); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "state: sync %s", b.dir)
	}
	return nil
}

// internal wraps a badger failure; typed errors pass through.
func internal(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	var e *errdefs.Error
	if errors.As(err, &e) {
		return err
	}
	return errdefs.Wrap(errdefs.RuntimeError, err, "state: "+format, args...)
}

func getJSON(txn *badger.Txn, key []byte, v any) (bool, error) {
	it, err := txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, it.Value(func(val []byte) error { return json.Unmarshal(val, v) })
}

func setJSON(txn *badger.Txn, key []byte, v any) error {
	val, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return txn.Set(key, val)
}

func exists(txn *badger.Txn, key []byte) (bool, error) {
	_, err := txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	return err == nil, err
}

// The per-exec stream bookkeeping is read and written on every append, so it
// is binary: version(1) then varints next, first, log bytes, log count,
// dropped events, dropped bytes, exited.
const metaFormat = 1

func encodeMeta(m evMeta) []byte {
	v := make([]byte, 1, 1+7*binary.MaxVarintLen64)
	v[0] = metaFormat
	exited := int64(0)
	if m.Exited {
		exited = 1
	}
	for _, n := range []int64{int64(m.Next), int64(m.First), m.LogBytes, int64(m.LogCount), int64(m.DroppedEvents), m.DroppedBytes, exited} {
		v = binary.AppendVarint(v, n)
	}
	return v
}

func decodeMeta(v []byte, m *evMeta) error {
	if len(v) < 1 || v[0] != metaFormat {
		return errors.New("corrupt exec stream record")
	}
	v = v[1:]
	var f [7]int64
	for i := range f {
		n, k := binary.Varint(v)
		if k <= 0 {
			return errors.New("corrupt exec stream record")
		}
		f[i], v = n, v[k:]
	}
	*m = evMeta{Next: int(f[0]), First: int(f[1]), LogBytes: f[2], LogCount: int(f[3]),
		DroppedEvents: int(f[4]), DroppedBytes: f[5], Exited: f[6] != 0}
	return nil
}

func getMeta(txn *badger.Txn, execID string, m *evMeta) (bool, error) {
	it, err := txn.Get(metaKey(execID))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, it.Value(func(v []byte) error { return decodeMeta(v, m) })
}

func setMeta(txn *badger.Txn, execID string, m evMeta) error {
	return txn.Set(metaKey(execID), encodeMeta(m))
}

// ---- boxes ----

func (b *Badger) PutBox(box Box) error {
	if err := checkID("box", box.ID); err != nil {
		return err
	}
	if err := b.begin(); err != nil {
		return err
	}
	defer b.end()
	err := b.update(func(txn *badger.Txn) error {
		// Reading the name (and the id it might equal) makes two racing
		// puts of the same name conflict: one commits, the other retries
		// and sees the name taken.
		if box.Name != "" {
			var owner []byte
			it, err := txn.Get(nameKey(box.Name))
			switch {
			case err == nil:
				if owner, err = it.ValueCopy(nil); err != nil {
					return err
				}
				if string(owner) != box.ID {
					return nameTaken(box.Name)
				}
			case !errors.Is(err, badger.ErrKeyNotFound):
				return err
			}
			if box.Name != box.ID {
				taken, err := exists(txn, boxKey(box.Name))
				if err != nil {
					return err
				}
				if taken {
					return nameTaken(box.Name)
				}
			}
		}
		var old Box
		found, err := getJSON(txn, boxKey(box.ID), &old)
		if err != nil {
			return err
		}
		if found && old.Name != "" && old.Name != box.Name {
			if err := txn.Delete(nameKey(old.Name)); err != nil {
				return err
			}
		}
		if box.Name != "" {
			if err := txn.Set(nameKey(box.Name), []byte(box.ID)); err != nil {
				return err
			}
		}
		return setJSON(txn, boxKey(box.ID), box)
	})
	if err != nil {
		return internal(err, "put box %s", box.ID)
	}
	return b.sync()
}

func (b *Badger) GetBox(idOrName string) (Box, error) {
	if err := b.begin(); err != nil {
		return Box{}, err
	}
	defer b.end()
	var box Box
	err := b.db.View(func(txn *badger.Txn) error {
		found, err := getJSON(txn, boxKey(idOrName), &box)
		if err != nil || found {
			return err
		}
		it, err := txn.Get(nameKey(idOrName))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return boxNotFound(idOrName)
		}
		if err != nil {
			return err
		}
		id, err := it.ValueCopy(nil)
		if err != nil {
			return err
		}
		found, err = getJSON(txn, boxKey(string(id)), &box)
		if err == nil && !found {
			return boxNotFound(idOrName)
		}
		return err
	})
	if err != nil {
		return Box{}, internal(err, "get box %s", idOrName)
	}
	return box, nil
}

func (b *Badger) ListBoxes() ([]Box, error) {
	if err := b.begin(); err != nil {
		return nil, err
	}
	defer b.end()
	out := []Box{}
	err := b.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(pBox), PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var box Box
			if err := it.Item().Value(func(v []byte) error { return json.Unmarshal(v, &box) }); err != nil {
				return err
			}
			out = append(out, box)
		}
		return nil
	})
	if err != nil {
		return nil, internal(err, "list boxes")
	}
	sortBoxes(out)
	return out, nil
}

// DeleteBox removes the box record and frees its name in one transaction,
// then purges its execs and their events in bounded transactions. A crash
// in between leaves a marker that the next Open finishes.
func (b *Badger) DeleteBox(id string) error {
	if err := b.begin(); err != nil {
		return err
	}
	defer b.end()
	if err := b.deleteBoxRecord(id); err != nil {
		return err
	}
	if err := b.sync(); err != nil {
		return err
	}
	return b.purgeBox(id)
}

func (b *Badger) deleteBoxRecord(id string) error {
	err := b.update(func(txn *badger.Txn) error {
		var box Box
		found, err := getJSON(txn, boxKey(id), &box)
		if err != nil {
			return err
		}
		if !found {
			return boxNotFound(id)
		}
		if box.Name != "" {
			it, err := txn.Get(nameKey(box.Name))
			if err == nil {
				owner, err := it.ValueCopy(nil)
				if err != nil {
					return err
				}
				if string(owner) == id {
					if err := txn.Delete(nameKey(box.Name)); err != nil {
						return err
					}
				}
			} else if !errors.Is(err, badger.ErrKeyNotFound) {
				return err
			}
		}
		if err := txn.Delete(boxKey(id)); err != nil {
			return err
		}
		return txn.Set(goneBoxKey(id), nil)
	})
	return internal(err, "delete box %s", id)
}

// purgeBox deletes the execs of a deleted box, then their events, then the
// box's marker.
func (b *Badger) purgeBox(boxID string) error {
	var gone []string
	for {
		var batch []string
		err := b.update(func(txn *badger.Txn) error {
			batch = batch[:0]
			prefix := boxExecPrefix(boxID)
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
			for it.Rewind(); it.Valid() && len(batch) < purgeBatch; it.Next() {
				batch = append(batch, string(it.Item().Key()[len(prefix):]))
			}
			it.Close()
			for _, xid := range batch {
				if err := b.deleteExecTxn(txn, boxID, xid); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return internal(err, "purge execs of box %s", boxID)
		}
		gone = append(gone, batch...)
		if len(batch) < purgeBatch {
			break
		}
	}
	if err := b.sync(); err != nil {
		return err
	}
	for _, xid := range gone {
		if err := b.sweepEvents(xid); err != nil {
			return err
		}
	}
	if err := b.db.Update(func(txn *badger.Txn) error { return txn.Delete(goneBoxKey(boxID)) }); err != nil {
		return internal(err, "purge box %s", boxID)
	}
	return nil
}

// deleteExecTxn removes an exec's records and leaves a marker for the sweep
// of its events.
func (b *Badger) deleteExecTxn(txn *badger.Txn, boxID, xid string) error {
	var m evMeta
	if _, err := getMeta(txn, xid, &m); err != nil {
		return err
	}
	for _, k := range [][]byte{execKey(xid), metaKey(xid), boxExecKey(boxID, xid)} {
		if err := txn.Delete(k); err != nil {
			return err
		}
	}
	return txn.Set(goneExecKey(xid), fmt.Appendf(nil, "%d", m.First))
}

// sweepEvents deletes the events of a deleted exec, from the first stored
// one (so no tombstones of earlier drops are walked), then its marker.
func (b *Badger) sweepEvents(xid string) error {
	first := 0
	err := b.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(goneExecKey(xid))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return it.Value(func(v []byte) error {
			_, err := fmt.Sscanf(string(v), "%d", &first)
			return err
		})
	})
	if err != nil {
		return internal(err, "sweep events of exec %s", xid)
	}
	prefix := eventPrefix(xid)
	for {
		var keys [][]byte
		err := b.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
			defer it.Close()
			for it.Seek(eventKey(xid, first)); it.Valid() && len(keys) < purgeBatch; it.Next() {
				keys = append(keys, it.Item().KeyCopy(nil))
			}
			return nil
		})
		if err == nil && len(keys) > 0 {
			err = b.update(func(txn *badger.Txn) error {
				for _, k := range keys {
					if err := txn.Delete(k); err != nil {
						return err
					}
				}
				return nil
			})
		}
		if err != nil {
			return internal(err, "sweep events of exec %s", xid)
		}
		if len(keys) < purgeBatch {
			break
		}
		first = seqOfKey(keys[len(keys)-1]) + 1
	}
	if err := b.db.Update(func(txn *badger.Txn) error { return txn.Delete(goneExecKey(xid)) }); err != nil {
		return internal(err, "sweep events of exec %s", xid)
	}
	b.dirty.Store(true)
	return nil
}

// recover finishes deletions interrupted by a crash.
func (b *Badger) recover() error {
	keysWith := func(prefix string) ([]string, error) {
		var ids []string
		err := b.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefix)})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				ids = append(ids, string(it.Item().Key()[len(prefix):]))
			}
			return nil
		})
		return ids, err
	}
	boxes, err := keysWith(pGoneBox)
	if err != nil {
		return internal(err, "recover deletions")
	}
	for _, id := range boxes {
		b.log.Info("state: finishing interrupted box deletion", "box", id)
		if err := b.purgeBox(id); err != nil {
			return err
		}
	}
	execs, err := keysWith(pGoneExec)
	if err != nil {
		return internal(err, "recover deletions")
	}
	for _, id := range execs {
		if err := b.sweepEvents(id); err != nil {
			return err
		}
	}
	return nil
}

// ---- execs ----

func (b *Badger) PutExec(x Exec) error {
	if err := checkID("exec", x.ID); err != nil {
		return err
	}
	if err := checkID("box", x.BoxID); err != nil {
		return err
	}
	if err := b.begin(); err != nil {
		return err
	}
	defer b.end()
	x.DroppedEvents, x.DroppedBytes = 0, 0
	err := b.update(func(txn *badger.Txn) error {
		// Reading the box key makes a racing DeleteBox and this put
		// conflict, so no exec outlives its box.
		ok, err := exists(txn, boxKey(x.BoxID))
		if err != nil {
			return err
		}
		if !ok {
			return boxNotFound(x.BoxID)
		}
		var old Exec
		found, err := getJSON(txn, execKey(x.ID), &old)
		if err != nil {
			return err
		}
		if found && old.BoxID != x.BoxID {
			if err := txn.Delete(boxExecKey(old.BoxID, x.ID)); err != nil {
				return err
			}
		}
		if !found {
			if err := setMeta(txn, x.ID, evMeta{}); err != nil {
				return err
			}
			if err := txn.Set(boxExecKey(x.BoxID, x.ID), nil); err != nil {
				return err
			}
		} else if old.BoxID != x.BoxID {
			if err := txn.Set(boxExecKey(x.BoxID, x.ID), nil); err != nil {
				return err
			}
		}
		return setJSON(txn, execKey(x.ID), x)
	})
	if err != nil {
		return internal(err, "put exec %s", x.ID)
	}
	// Exec records change twice per command: an fsync each would cost
	// more than a quick command itself. They are synced with the events.
	b.dirty.Store(true)
	return nil
}

// readExec reads an exec with the store's retention counters.
func readExec(txn *badger.Txn, id string) (Exec, bool, error) {
	var x Exec
	found, err := getJSON(txn, execKey(id), &x)
	if err != nil || !found {
		return x, found, err
	}
	var m evMeta
	if _, err := getMeta(txn, id, &m); err != nil {
		return x, true, err
	}
	x.DroppedEvents, x.DroppedBytes = m.DroppedEvents, m.DroppedBytes
	return x, true, nil
}

func (b *Badger) GetExec(id string) (Exec, error) {
	if err := b.begin(); err != nil {
		return Exec{}, err
	}
	defer b.end()
	var x Exec
	err := b.db.View(func(txn *badger.Txn) error {
		var found bool
		var err error
		x, found, err = readExec(txn, id)
		if err == nil && !found {
			return execNotFound(id)
		}
		return err
	})
	if err != nil {
		return Exec{}, internal(err, "get exec %s", id)
	}
	return x, nil
}

func (b *Badger) ListExecs(boxID string) ([]Exec, error) {
	if err := b.begin(); err != nil {
		return nil, err
	}
	defer b.end()
	out := []Exec{}
	err := b.db.View(func(txn *badger.Txn) error {
		ok, err := exists(txn, boxKey(boxID))
		if err != nil {
			return err
		}
		if !ok {
			return boxNotFound(boxID)
		}
		prefix := boxExecPrefix(boxID)
		var ids []string
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
		for it.Rewind(); it.Valid(); it.Next() {
			ids = append(ids, string(it.Item().Key()[len(prefix):]))
		}
		it.Close()
		for _, id := range ids {
			x, found, err := readExec(txn, id)
			if err != nil {
				return err
			}
			if found {
				out = append(out, x)
			}
		}
		return nil
	})
	if err != nil {
		return nil, internal(err, "list execs of box %s", boxID)
	}
	sortExecs(out)
	return out, nil
}

// ---- events ----

// Event value: version(1) type(1) stream(1) time-len(1) time(MarshalBinary) data.
const eventFormat = 1

func encodeEvent(ev Event) ([]byte, error) {
	tb, err := ev.Time.MarshalBinary()
	if err != nil {
		return nil, err
	}
	var typ, stream byte
	if ev.Type == EventExit {
		typ = 1
	}
	switch ev.Stream {
	case Stdout:
		stream = 1
	case Stderr:
		stream = 2
	}
	v := make([]byte, 0, 4+len(tb)+len(ev.Data))
	v = append(v, eventFormat, typ, stream, byte(len(tb)))
	v = append(v, tb...)
	return append(v, ev.Data...), nil
}

// decodeEventHead returns an event's type and data length without copying
// the data.
func decodeEventHead(v []byte) (typ string, dataLen int, err error) {
	if len(v) < 4 || v[0] != eventFormat || len(v) < 4+int(v[3]) {
		return "", 0, errors.New("corrupt event record")
	}
	typ = EventLog
	if v[1] == 1 {
		typ = EventExit
	}
	return typ, len(v) - 4 - int(v[3]), nil
}

func decodeEvent(seq int, v []byte) (Event, error) {
	typ, _, err := decodeEventHead(v)
	if err != nil {
		return Event{}, err
	}
	ev := Event{Seq: seq, Type: typ}
	switch v[2] {
	case 1:
		ev.Stream = Stdout
	case 2:
		ev.Stream = Stderr
	}
	tl := int(v[3])
	if err := ev.Time.UnmarshalBinary(v[4 : 4+tl]); err != nil {
		return Event{}, err
	}
	ev.Data = string(v[4+tl:])
	return ev, nil
}

// AppendEvent stores ev and the updated stream bookkeeping in one
// transaction, dropping the oldest log events while over the caps. The
// drops start at the first stored seq (kept in the bookkeeping), so an
// append costs O(events it drops), never a walk over the stored ones or the
// tombstones of earlier drops.
func (b *Badger) AppendEvent(execID string, ev Event) error {
	if err := b.begin(); err != nil {
		return err
	}
	defer b.end()
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	more := false
	err := b.update(func(txn *badger.Txn) error {
		var m evMeta
		found, err := getMeta(txn, execID, &m)
		if err != nil {
			return err
		}
		if !found {
			return execNotFound(execID)
		}
		e := ev
		if err := b.pol.prepare(execID, &m, &e); err != nil {
			return err
		}
		val, err := encodeEvent(e)
		if err != nil {
			return err
		}
		if err := txn.Set(eventKey(execID, e.Seq), val); err != nil {
			return err
		}
		if more, err = b.dropOldest(txn, execID, &m); err != nil {
			return err
		}
		return setMeta(txn, execID, m)
	})
	// An event that evicted more than one transaction may hold: finish in
	// follow-up transactions (the caps are briefly exceeded meanwhile).
	for err == nil && more {
		err = b.update(func(txn *badger.Txn) error {
			var m evMeta
			found, err := getMeta(txn, execID, &m)
			if err != nil || !found {
				more = false
				return err
			}
			if more, err = b.dropOldest(txn, execID, &m); err != nil {
				return err
			}
			return setMeta(txn, execID, m)
		})
	}
	if err != nil {
		return internal(err, "append event to exec %s", execID)
	}
	b.dirty.Store(true)
	return nil
}

// dropOldest deletes the oldest stored log events while m is over the caps,
// at most maxDropsPerTxn of them, and moves m.First past them. It reports
// whether more must be dropped.
func (b *Badger) dropOldest(txn *badger.Txn, execID string, m *evMeta) (bool, error) {
	if !b.pol.over(m) {
		return false, nil
	}
	prefix := eventPrefix(execID)
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
	var del [][]byte
	first := -1
	for it.Seek(eventKey(execID, m.First)); it.Valid(); it.Next() {
		item := it.Item()
		b.work.Add(1)
		seq := seqOfKey(item.Key())
		if !b.pol.over(m) || len(del) == maxDropsPerTxn {
			first = seq
			break
		}
		var typ string
		var n int
		err := item.Value(func(v []byte) error {
			var err error
			typ, n, err = decodeEventHead(v)
			return err
		})
		if err != nil {
			it.Close()
			return false, err
		}
		if typ != EventLog {
			first = seq // only the exit event, which is last and never dropped
			break
		}
		del = append(del, item.KeyCopy(nil))
		m.drop(n)
	}
	it.Close()
	for _, k := range del {
		if err := txn.Delete(k); err != nil {
			return false, err
		}
	}
	if first >= 0 {
		m.First = first
	} else {
		m.First = m.Next
	}
	return len(del) == maxDropsPerTxn && b.pol.over(m), nil
}

func (b *Badger) Events(execID string, fromSeq int) ([]Event, error) {
	return b.EventsPage(execID, fromSeq, 0)
}

func (b *Badger) EventsPage(execID string, fromSeq, maxBytes int) ([]Event, error) {
	if err := b.begin(); err != nil {
		return nil, err
	}
	defer b.end()
	out := []Event{}
	size := 0
	err := b.db.View(func(txn *badger.Txn) error {
		var m evMeta
		found, err := getMeta(txn, execID, &m)
		if err != nil {
			return err
		}
		if !found {
			return execNotFound(execID)
		}
		prefix := eventPrefix(execID)
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Seek(eventKey(execID, max(fromSeq, m.First, 0))); it.Valid(); it.Next() {
			item := it.Item()
			seq := seqOfKey(item.Key())
			var ev Event
			err := item.Value(func(v []byte) error {
				var err error
				ev, err = decodeEvent(seq, v)
				return err
			})
			if err != nil {
				return err
			}
			out = append(out, ev)
			if size += len(ev.Data); maxBytes > 0 && size >= maxBytes {
				break
			}
		}
		return nil
	})
	if err != nil {
		return nil, internal(err, "read events of exec %s", execID)
	}
	return out, nil
}

// ---- background work ----

// syncLoop syncs event writes at least every eventSyncInterval.
func (b *Badger) syncLoop() {
	defer b.wg.Done()
	t := time.NewTicker(eventSyncInterval)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
			if b.dirty.Swap(false) {
				if err := b.db.Sync(); err != nil {
					b.log.Warn("state: sync failed", "dir", b.dir, "err", err)
				}
			}
		}
	}
}

// gcLoop reclaims value log space held by dropped large events.
func (b *Badger) gcLoop() {
	defer b.wg.Done()
	t := time.NewTicker(vlogGCInterval)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
			for {
				select {
				case <-b.stop:
					return
				default:
				}
				if err := b.db.RunValueLogGC(0.5); err != nil {
					if !errors.Is(err, badger.ErrNoRewrite) {
						b.log.Debug("state: value log GC", "err", err)
					}
					break
				}
			}
		}
	}
}

// badgerLogger routes badger's messages to slog; its info and debug
// chatter (compactions, flushes) goes to debug.
type badgerLogger struct{ l *slog.Logger }

func msg(format string, args []any) string {
	return "badger: " + strings.TrimRight(fmt.Sprintf(format, args...), "\n")
}

func (l badgerLogger) Errorf(f string, a ...any)   { l.l.Error(msg(f, a)) }
func (l badgerLogger) Warningf(f string, a ...any) { l.l.Warn(msg(f, a)) }
func (l badgerLogger) Infof(f string, a ...any)    { l.l.Debug(msg(f, a)) }
func (l badgerLogger) Debugf(f string, a ...any)   { l.l.Debug(msg(f, a)) }

// ---- test helpers ----

// storedEvents counts the event records stored for an exec, tombstoned or
// not-yet-swept included (tests).
func (b *Badger) storedEvents(execID string) int {
	n := 0
	_ = b.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: eventPrefix(execID)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	return n
}

func (b *Badger) retentionWork() int64 { return b.work.Load() }

// keyCount counts live keys with a prefix (tests).
func (b *Badger) keyCount(prefix string) int {
	n := 0
	_ = b.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefix)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	return n
}

var _ Store = (*Badger)(nil)
