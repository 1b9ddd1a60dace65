using System.Diagnostics;
using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img bench: the same options, offsets and output; requests are async with depth in flight.</summary>
internal sealed class BenchCommand : Command
{
    public override string Name => "bench";

    public override string Synopsis => "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename";

    public override string Help => """
        Runs a simple I/O benchmark: count requests of buffer_size bytes, depth of them in flight,
        starting at offset and stepping by step_size (wrapping around the end of the image).
          -c count             number of requests (default 75000)
          -d depth             requests in flight (default 64)
          -s size              bytes per request (default 4K)
          -S step              distance between request offsets (default: the buffer size)
          -o offset            offset of the first request (default 0)
          -w                   write instead of read
          --pattern=byte       byte written by -w (default 0)
          --flush-interval=n   flush after every n requests (writes only; n >= depth)
          --no-drain           flush without waiting for in-flight requests first
          -t cache             none, writeback, writethrough, directsync, unsafe (default writeback)
          -f fmt               qcow2 or raw (default: detected)
          -i aio, -n, -q, -U   accepted for compatibility

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("c:d:f:ni:o:qs:S:t:wU", ("flush-interval", true), ("no-drain", false), ("pattern", true),
            ("image-opts", false), ("force-share", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var count = 75000;
        var depth = 64;
        var bufSize = 4096;
        var step = 0;
        long offset = 0;
        var pattern = 0;
        var flushInterval = 0;
        foreach (var (key, value) in o.Options)
        {
            var v = value ?? "";
            switch (key)
            {
                case "c":
                    count = StrToInt(v, "Invalid request count specified");
                    break;
                case "d":
                    depth = StrToInt(v, "Invalid queue depth specified");
                    if (depth == 0)
                    {
                        // qemu-img 7.2 accepts 0 and then waits forever; refuse it instead.
                        throw new CliException("Invalid queue depth specified");
                    }
                    break;
                case "s":
                    bufSize = (int)SizeParser.Parse("buffer size", v, 0, int.MaxValue);
                    break;
                case "S":
                    step = (int)SizeParser.Parse("step_size", v, 0, int.MaxValue);
                    break;
                case "o":
                    offset = SizeParser.Parse("offset", v);
                    break;
                case "pattern":
                    pattern = SizeParser.TryParseInteger(v, out var p) && p <= 0xff ? (int)p : throw new CliException("Invalid pattern byte specified");
                    break;
                case "flush-interval":
                    flushInterval = StrToInt(v, "Invalid flush interval specified");
                    break;
                case "i":
                    if (v is not ("threads" or "native" or "io_uring"))
                    {
                        throw new CliException($"Invalid aio option: {v}");
                    }
                    break;
            }
        }
        var write = o.Has("w");
        var cache = CacheMode.Parse(o.Get("t"));
        if (o.Operands.Count != 1)
        {
            throw new CliException("Expecting one image file name");
        }
        if (!write && flushInterval != 0)
        {
            throw new CliException("--flush-interval is only available in write tests");
        }
        if (flushInterval != 0 && flushInterval < depth)
        {
            throw new CliException("Flush interval can't be smaller than depth");
        }
        var path = o.Operands[0];
        if ((o.Has("n") || o.Get("i") == "native") && !cache.Direct)
        {
            throw new CliException($"Could not open '{path}': aio=native was specified, but it requires cache.direct=on, which was not specified.");
        }
        using var disk = DiskOpener.Open(path, o.Get("f"), writable: write, cache);
        using var bench = new BenchRun(disk, new BenchSettings(count, depth, bufSize, step == 0 ? bufSize : step, offset, write, (byte)pattern, flushInterval, !o.Has("no-drain")));
        ctx.Out.WriteLine($"Sending {count} {(write ? "write" : "read")} requests, {bufSize} bytes each, {depth} in parallel (starting at offset {offset}, step size {bench.Settings.Step})");
        if (flushInterval != 0)
        {
            ctx.Out.WriteLine($"Sending flush every {flushInterval} requests");
        }
        ctx.Out.Flush();
        var elapsed = bench.Run();
        ctx.Out.WriteLine($"Run completed in {CFormat.Fixed(elapsed.TotalSeconds, 3)} seconds.");
        return 0;
    }

    /// <summary>qemu_strtoul base 0, at most INT_MAX, as qemu-img bench reads -c, -d and --flush-interval.</summary>
    private static int StrToInt(string text, string error)
        => SizeParser.TryParseInteger(text, out var v) && v <= int.MaxValue ? (int)v : throw new CliException(error);
}

internal sealed record BenchSettings(int Count, int Depth, int BufferSize, int Step, long Offset, bool Write, byte Pattern, int FlushInterval, bool Drain);

/// <summary>
/// The request loop: depth workers, each owning a slice of one aligned buffer, claim request numbers
/// from a shared counter, so nothing is allocated per request on our side.
/// </summary>
internal sealed class BenchRun : IDisposable
{
    private readonly Disk _disk;
    private readonly AlignedBuffer _buffer;
    private readonly long _modulus;
    private int _next;
    private int _batchEnd;

    public BenchRun(Disk disk, BenchSettings settings)
    {
        _disk = disk;
        Settings = settings;
        _buffer = new AlignedBuffer((int)Math.Min(int.MaxValue, (long)settings.Depth * settings.BufferSize));
        _buffer.GetSpan().Fill(settings.Pattern);
        _modulus = disk.Size;
    }

    public BenchSettings Settings { get; }

    /// <summary>
    /// qemu-img 7.2's sequence: the first request at the start offset, each later one a step further,
    /// reduced modulo the image size (so a request may run past the end and fail, as in qemu-img).
    /// </summary>
    internal long OffsetOf(int request)
    {
        if (request == 0)
        {
            return Settings.Offset;
        }
        if (_modulus == 0)
        {
            return 0;
        }
        var m = (UInt128)_modulus;
        return (long)(((UInt128)Settings.Offset + (UInt128)request * (UInt128)Settings.Step) % m);
    }

    public TimeSpan Run()
    {
        // Blocking I/O (O_DIRECT above all) runs on pool threads: let depth of them run at once.
        ThreadPool.GetMinThreads(out var workers, out var io);
        ThreadPool.SetMinThreads(Math.Max(workers, Math.Min(Settings.Depth, 256) + Environment.ProcessorCount), io);
        var sw = Stopwatch.StartNew();
        RunAsync().GetAwaiter().GetResult();
        sw.Stop();
        return sw.Elapsed;
    }

    public void Dispose() => ((IDisposable)_buffer).Dispose();

    private async Task RunAsync()
    {
        var s = Settings;
        if (s.FlushInterval == 0 || !s.Drain)
        {
            _batchEnd = s.Count;
            await RunWorkers().ConfigureAwait(false);
            return;
        }
        // With draining, qemu-img flushes whenever the requests not yet sent are a multiple of the
        // interval: a first batch of count % interval, then whole intervals, each followed by a flush.
        if (s.Count == 0)
        {
            return;
        }
        var first = s.Count % s.FlushInterval;
        _batchEnd = first > 0 ? first : Math.Min(s.Count, s.FlushInterval);
        while (true)
        {
            await RunWorkers().ConfigureAwait(false);
            await _disk.FlushAsync().ConfigureAwait(false);
            if (_batchEnd >= s.Count)
            {
                return;
            }
            _batchEnd = Math.Min(s.Count, _batchEnd + s.FlushInterval);
        }
    }

    /// <summary>
    /// With O_DIRECT every request waits on the device, so depth of them are kept in flight through
    /// the async API. Through the page cache a request is a memory copy that completes at once; then
    /// the depth request slots are served by one blocking thread per core, which is several times
    /// faster than paying a thread-pool hand-off per request.
    /// </summary>
    private Task RunWorkers()
    {
        var slots = Math.Min(Settings.Depth, Math.Max(1, _batchEnd - _next));
        if (_disk.Cache.Direct)
        {
            var tasks = new Task[slots];
            for (var i = 0; i < slots; i++)
            {
                var slot = i;
                tasks[i] = Task.Run(() => AsyncWorker(slot));
            }
            return Task.WhenAll(tasks);
        }
        var threads = new Thread[Math.Min(slots, Environment.ProcessorCount)];
        Exception? failure = null;
        for (var i = 0; i < threads.Length; i++)
        {
            var slot = i;
            threads[i] = new Thread(() =>
            {
                try
                {
                    SyncWorker(slot);
                }
                catch (Exception e)
                {
                    Interlocked.CompareExchange(ref failure, e, null);
                    Volatile.Write(ref _batchEnd, 0);
                }
            })
            { IsBackground = true, Name = "bench" };
            threads[i].Start();
        }
        foreach (var t in threads)
        {
            t.Join();
        }
        return failure is null ? Task.CompletedTask : Task.FromException(failure);
    }

    private bool TryClaim(out int request)
    {
        do
        {
            request = Volatile.Read(ref _next);
            if (request >= Volatile.Read(ref _batchEnd))
            {
                return false;
            }
        }
        while (Interlocked.CompareExchange(ref _next, request + 1, request) != request);
        return true;
    }

    private bool FlushDue(int request)
        => Settings.FlushInterval != 0 && !Settings.Drain && (Settings.Count - request - 1) % Settings.FlushInterval == 0;

    private static CliException Failed(Exception e)
        => new(e is ArgumentOutOfRangeException ? "Failed request: Input/output error" : $"Failed request: {e.Message}", e);

    private void SyncWorker(int slot)
    {
        var s = Settings;
        var memory = _buffer.Memory.Slice(slot * s.BufferSize, s.BufferSize);
        while (TryClaim(out var request))
        {
            var offset = OffsetOf(request);
            try
            {
                if (s.Write)
                {
                    _disk.Write(offset, memory.Span);
                }
                else
                {
                    _disk.Read(offset, memory.Span);
                }
            }
            catch (Exception e) when (e is IOException or ArgumentException or InvalidOperationException or NotSupportedException)
            {
                throw Failed(e);
            }
            if (FlushDue(request))
            {
                _disk.Flush();
            }
        }
    }

    private async Task AsyncWorker(int slot)
    {
        var s = Settings;
        var memory = _buffer.Memory.Slice(slot * s.BufferSize, s.BufferSize);
        while (TryClaim(out var request))
        {
            var offset = OffsetOf(request);
            try
            {
                if (s.Write)
                {
                    await _disk.WriteAsync(offset, memory).ConfigureAwait(false);
                }
                else
                {
                    await _disk.ReadAsync(offset, memory).ConfigureAwait(false);
                }
            }
            catch (Exception e) when (e is IOException or ArgumentException or InvalidOperationException or NotSupportedException)
            {
                throw Failed(e);
            }
            if (FlushDue(request))
            {
                await _disk.FlushAsync().ConfigureAwait(false);
            }
        }
    }
}
