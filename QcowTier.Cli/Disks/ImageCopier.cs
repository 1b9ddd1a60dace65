using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>
/// The copy loop of convert, planned from the source's block status: known-zero runs are never
/// read, data is copied in 2 MiB chunks, and every block of -S bytes that is all zero is left out.
/// For a qcow2 target, reader threads fill a few buffers and the calling thread writes them in guest
/// order, so the target is laid out sequentially (qemu-img's in-order writes); a raw target has no
/// layout, so there every thread reads and writes its own chunks.
/// Dedicated threads with blocking I/O rather than the thread pool: on a busy machine pool workers
/// spin for work, and the copy is bound by memory bandwidth, not by the number of requests.
/// </summary>
internal sealed class ImageCopier
{
    private readonly Disk _source;
    private readonly Disk _target;
    private readonly long _sparse;
    private readonly int _readers;
    private readonly int _chunkSize;
    private readonly bool _targetKnownZero;
    private readonly Progress _progress;
    private readonly double _percentPerByte;
    private readonly object _lock = new();
    private readonly Dictionary<long, Piece> _done = [];
    private readonly Stack<int> _free = new();
    private IEnumerator<(long Offset, long Length, bool Zero)>? _plan;
    private long _nextSeq;
    private bool _planEnded;
    private bool _stop;

    private readonly int _compressCluster; // convert -c: the target's cluster size, else 0

    public ImageCopier(Disk source, Disk target, long sparse, int readers, int chunkSize, bool targetKnownZero, Progress progress, bool compress = false)
    {
        if (compress)
        {
            var qcow = target as QcowDisk ?? throw new CliException("Compression not supported for this file format");
            _compressCluster = qcow.Image.ClusterSize;
        }
        _source = source;
        _target = target;
        _sparse = sparse;
        _readers = readers;
        _chunkSize = chunkSize;
        _targetKnownZero = targetKnownZero;
        _progress = progress;
        _percentPerByte = source.Size > 0 ? 100.0 / source.Size : 0;
    }

    private sealed record Piece(long Offset, long Length, bool Zero, int Buffer, Exception? Error);

    public void Run()
    {
        if (_target is RawDisk)
        {
            RunUnordered();
            return;
        }
        // Two buffers per reader: one being filled while the writer drains another.
        var buffers = new AlignedBuffer[_readers * 2];
        for (var i = 0; i < buffers.Length; i++)
        {
            buffers[i] = new AlignedBuffer(_chunkSize);
            _free.Push(i);
        }
        _plan = Plan().GetEnumerator();
        var threads = new Thread[_readers];
        for (var i = 0; i < threads.Length; i++)
        {
            threads[i] = new Thread(() => ReaderLoop(buffers)) { IsBackground = true, Name = "convert reader" };
            threads[i].Start();
        }
        try
        {
            WriterLoop(buffers);
        }
        finally
        {
            lock (_lock)
            {
                _stop = true;
                Monitor.PulseAll(_lock);
            }
            foreach (var t in threads)
            {
                t.Join();
            }
            _plan.Dispose();
            foreach (var b in buffers)
            {
                ((IDisposable)b).Dispose();
            }
        }
    }

    /// <summary>
    /// A raw target has no layout to keep in order, so each thread copies whole chunks on its own:
    /// the kernel's copies into the page cache then run on every core instead of one writer's.
    /// </summary>
    private void RunUnordered()
    {
        _plan = Plan().GetEnumerator();
        Exception? failure = null;
        var threads = new Thread[Math.Max(2, _readers)];
        for (var i = 0; i < threads.Length; i++)
        {
            threads[i] = new Thread(() =>
            {
                using var buffer = new AlignedBuffer(_chunkSize);
                try
                {
                    while (true)
                    {
                        (long Offset, long Length, bool Zero) item;
                        lock (_lock)
                        {
                            if (_stop || !_plan.MoveNext())
                            {
                                return;
                            }
                            item = _plan.Current;
                        }
                        if (item.Zero)
                        {
                            if (!_targetKnownZero)
                            {
                                _target.WriteZeroes(item.Offset, item.Length, mayUnmap: true);
                            }
                        }
                        else
                        {
                            var span = buffer.GetSpan()[..(int)item.Length];
                            try
                            {
                                _source.Read(item.Offset, span);
                            }
                            catch (Exception e) when (e is IOException or NotSupportedException or InvalidOperationException or ArgumentException)
                            {
                                throw new CliException($"error while reading at byte {item.Offset}: {e.Message}", e);
                            }
                            Store(item.Offset, span);
                        }
                        _progress.Advance(item.Length * _percentPerByte);
                    }
                }
                catch (Exception e)
                {
                    lock (_lock)
                    {
                        failure ??= e;
                        _stop = true;
                    }
                }
            })
            { IsBackground = true, Name = "convert copier" };
            threads[i].Start();
        }
        foreach (var t in threads)
        {
            t.Join();
        }
        _plan.Dispose();
        if (failure is not null)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(failure);
        }
    }

    private void ReaderLoop(AlignedBuffer[] buffers)
    {
        while (true)
        {
            long seq;
            (long Offset, long Length, bool Zero) item;
            var buffer = -1;
            lock (_lock)
            {
                while (!_stop && !_planEnded && _free.Count == 0)
                {
                    Monitor.Wait(_lock);
                }
                if (_stop || _planEnded)
                {
                    return;
                }
                try
                {
                    if (!_plan!.MoveNext())
                    {
                        _planEnded = true;
                        Monitor.PulseAll(_lock);
                        return;
                    }
                }
                catch (Exception e)
                {
                    _done[_nextSeq] = new Piece(0, 0, true, -1, e);
                    _planEnded = true;
                    Monitor.PulseAll(_lock);
                    return;
                }
                item = _plan.Current;
                seq = _nextSeq++;
                if (!item.Zero)
                {
                    buffer = _free.Pop();
                }
            }
            Exception? error = null;
            if (!item.Zero)
            {
                try
                {
                    _source.Read(item.Offset, buffers[buffer].GetSpan()[..(int)item.Length]);
                }
                catch (Exception e)
                {
                    error = e is IOException or NotSupportedException or InvalidOperationException or ArgumentException
                        ? new CliException($"error while reading at byte {item.Offset}: {e.Message}", e)
                        : e;
                }
            }
            lock (_lock)
            {
                _done[seq] = new Piece(item.Offset, item.Length, item.Zero, buffer, error);
                Monitor.PulseAll(_lock);
            }
        }
    }

    private void WriterLoop(AlignedBuffer[] buffers)
    {
        for (long seq = 0; ; seq++)
        {
            Piece? piece;
            lock (_lock)
            {
                while (!_done.Remove(seq, out piece))
                {
                    if (_planEnded && seq >= _nextSeq)
                    {
                        return;
                    }
                    Monitor.Wait(_lock);
                }
            }
            if (piece.Error is not null)
            {
                throw piece.Error;
            }
            if (piece.Zero)
            {
                if (!_targetKnownZero)
                {
                    _target.WriteZeroes(piece.Offset, piece.Length, mayUnmap: true);
                }
            }
            else
            {
                Store(piece.Offset, buffers[piece.Buffer].GetSpan()[..(int)piece.Length]);
                lock (_lock)
                {
                    _free.Push(piece.Buffer);
                    Monitor.PulseAll(_lock);
                }
            }
            _progress.Advance(piece.Length * _percentPerByte);
        }
    }

    /// <summary>Runs of the source in order: known-zero ranges whole, data split at chunk boundaries.</summary>
    private IEnumerable<(long Offset, long Length, bool Zero)> Plan()
    {
        if (_compressCluster > 0)
        {
            return CompressedPlan();
        }
        return PlainPlan();
    }

    /// <summary>
    /// For convert -c: whole chunks (so whole target clusters) are read and compressed as soon as any
    /// part of them holds data; chunks that are all zero are skipped as usual.
    /// </summary>
    private IEnumerable<(long Offset, long Length, bool Zero)> CompressedPlan()
    {
        var size = _source.Size;
        IEnumerable<BlockStatus> runs = _sparse == 0
            ? [new BlockStatus(0, size, true, false, true, null)]
            : _source.GetStatus(0, size);
        long chunkStart = 0;
        var hasData = false;
        foreach (var run in runs)
        {
            for (var pos = run.Start; pos < run.End;)
            {
                var chunkEnd = Math.Min(size, (pos / _chunkSize + 1) * _chunkSize);
                hasData |= !run.Zero;
                pos = Math.Min(run.End, chunkEnd);
                if (pos == chunkEnd)
                {
                    yield return (chunkStart, chunkEnd - chunkStart, !hasData);
                    chunkStart = chunkEnd;
                    hasData = false;
                }
            }
        }
    }

    private IEnumerable<(long Offset, long Length, bool Zero)> PlainPlan()
    {
        var size = _source.Size;
        IEnumerable<BlockStatus> runs = _sparse == 0
            ? [new BlockStatus(0, size, true, false, true, null)]
            : _source.GetStatus(0, size);
        foreach (var run in runs)
        {
            if (run.Zero)
            {
                yield return (run.Start, run.Length, true);
                continue;
            }
            for (var pos = run.Start; pos < run.End;)
            {
                var end = Math.Min(run.End, (pos / _chunkSize + 1) * _chunkSize);
                yield return (pos, end - pos, false);
                pos = end;
            }
        }
    }

    private void Store(long offset, ReadOnlySpan<byte> data)
    {
        try
        {
            if (_compressCluster > 0)
            {
                WriteCompressed(offset, data);
            }
            else if (_sparse == 0)
            {
                _target.Write(offset, data);
            }
            else
            {
                WriteSparse(offset, data);
            }
        }
        catch (Exception e) when (e is IOException or NotSupportedException or InvalidOperationException or ArgumentException)
        {
            throw new CliException($"error while writing at byte {offset}: {e.Message}", e);
        }
    }

    /// <summary>Compresses every cluster of the chunk that is not all zero (qemu-img convert -c), whole runs at a time.</summary>
    private void WriteCompressed(long offset, ReadOnlySpan<byte> data)
    {
        var target = (QcowDisk)_target;
        var runStart = -1;
        for (var pos = 0; pos < data.Length; pos += _compressCluster)
        {
            var end = Math.Min(data.Length, pos + _compressCluster);
            if (_sparse != 0 && !data[pos..end].ContainsAnyExcept((byte)0))
            {
                if (runStart >= 0)
                {
                    target.WriteCompressed(offset + runStart, data[runStart..pos]);
                    runStart = -1;
                }
                if (!_targetKnownZero)
                {
                    _target.WriteZeroes(offset + pos, end - pos, mayUnmap: true);
                }
            }
            else if (runStart < 0)
            {
                runStart = pos;
            }
        }
        if (runStart >= 0)
        {
            target.WriteCompressed(offset + runStart, data[runStart..]);
        }
    }

    /// <summary>Writes the buffer's non-zero blocks (blocks of -S bytes, aligned in the guest), coalesced.</summary>
    private void WriteSparse(long offset, ReadOnlySpan<byte> data)
    {
        var runStart = -1;
        var pos = 0;
        while (pos < data.Length)
        {
            var blockEnd = (int)Math.Min(data.Length, (offset + pos) / _sparse * _sparse + _sparse - offset);
            if (!data[pos..blockEnd].ContainsAnyExcept((byte)0))
            {
                if (runStart >= 0)
                {
                    _target.Write(offset + runStart, data[runStart..pos]);
                    runStart = -1;
                }
                if (!_targetKnownZero)
                {
                    _target.WriteZeroes(offset + pos, blockEnd - pos, mayUnmap: true);
                }
            }
            else if (runStart < 0)
            {
                runStart = pos;
            }
            pos = blockEnd;
        }
        if (runStart >= 0)
        {
            _target.Write(offset + runStart, data[runStart..]);
        }
    }
}
