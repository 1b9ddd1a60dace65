using System.Diagnostics;
using System.Text;
using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Io;

/// <summary>
/// qemu-io's command language on an open disk: read, write, discard, flush, length (and their
/// short aliases), with qemu-io's messages and report lines. A failed command does not stop the
/// ones after it; it only makes the exit status 1, as in qemu-io.
/// </summary>
internal sealed class QemuIoShell
{
    /// <summary>BDRV_REQUEST_MAX_BYTES.</summary>
    private const long MaxRequest = 2147483136;

    private readonly Disk _disk;
    private readonly bool _readOnly;
    private readonly TextWriter _out;
    private readonly TextWriter _err;

    private sealed record CommandInfo(string Name, string? Alias, int ArgMin, int ArgMax, string Args, string Summary, Func<QemuIoShell, string[], bool> Run);

    private static readonly CommandInfo[] Commands =
    [
        new("discard", "d", 2, -1, "[-Cq] off len", "discards a number of bytes at a specified offset", (s, a) => s.Discard(a)),
        new("flush", "f", 0, 0, "", "flush all in-core file state to disk", (s, _) => s.Flush()),
        new("help", "?", 0, 1, "[command]", "help for one or all commands", (s, a) => s.Help(a)),
        new("length", "len", 0, 0, "", "gets the length of the current file", (s, _) => s.Length()),
        new("read", "r", 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len", "reads a number of bytes at a specified offset", (s, a) => s.Read(a)),
        new("write", "w", 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len", "writes a number of bytes at a specified offset", (s, a) => s.Write(a)),
    ];

    public QemuIoShell(Disk disk, bool readOnly, TextWriter stdout, TextWriter stderr)
    {
        _disk = disk;
        _readOnly = readOnly;
        _out = stdout;
        _err = stderr;
    }

    /// <summary>Runs one command line; false when it failed.</summary>
    public bool Execute(string line)
    {
        var argv = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (argv.Length == 0)
        {
            return true;
        }
        var info = Commands.FirstOrDefault(c => c.Name == argv[0] || c.Alias == argv[0]);
        if (info is null)
        {
            ErrorLine($"command \"{argv[0]}\" not found");
            return false;
        }
        var n = argv.Length - 1;
        if (n < info.ArgMin || (info.ArgMax != -1 && n > info.ArgMax))
        {
            ErrorLine(info.ArgMax == -1 ? $"bad argument count {n} to {info.Name}, expected at least {info.ArgMin} arguments"
                : info.ArgMin == info.ArgMax ? $"bad argument count {n} to {info.Name}, expected {info.ArgMin} arguments"
                : $"bad argument count {n} to {info.Name}, expected between {info.ArgMin} and {info.ArgMax} arguments");
            return false;
        }
        if (info.Name is "write" or "discard" && _readOnly)
        {
            ErrorLine("Block node is read-only");
            return false;
        }
        return info.Run(this, argv);
    }

    private void ErrorLine(string message)
    {
        _out.Flush();
        _err.WriteLine("qcowtier: " + message);
        _err.Flush();
    }

    private void Usage(string name)
    {
        var c = Commands.First(x => x.Name == name);
        _out.WriteLine($"{c.Name} {c.Args} -- {c.Summary}");
    }

    /// <summary>qemu-io's getopt loop for a command: false (after the usage line) on an unknown option.</summary>
    private bool ParseOptions(string name, string[] argv, string spec, out ParsedOptions options)
    {
        try
        {
            options = new OptionParser(spec) { GetoptMessages = true }.Parse(argv.Skip(1).ToList());
        }
        catch (CliException e)
        {
            Usage(name);
            ErrorLine($"{name}: {e.Message}");
            options = null!;
            return false;
        }
        if (options.Has("h") || options.Operands.Count != 2)
        {
            Usage(name);
            return false;
        }
        return true;
    }

    /// <summary>cvtnum with print_cvtnum_err's wording on stdout.</summary>
    private bool Number(string text, out long value)
    {
        value = 0;
        switch (SizeParser.TryParse(text, out var v))
        {
            case SizeParser.Outcome.Ok when v <= long.MaxValue:
                value = (long)v;
                return true;
            case SizeParser.Outcome.Invalid:
                _out.WriteLine($"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}");
                return false;
            default:
                _out.WriteLine($"Parsing error: argument too large -- {text}");
                return false;
        }
    }

    /// <summary>parse_pattern: strtol base 0, 0 to 255.</summary>
    private bool Pattern(string text, out byte pattern)
    {
        pattern = 0;
        var t = text.Trim();
        var negative = t.StartsWith('-');
        if (t.StartsWith('+') || negative)
        {
            t = t[1..];
        }
        if (!SizeParser.TryParseInteger(t, out var v) || (negative && v != 0) || v > 255)
        {
            _out.WriteLine($"{text} is not a valid pattern byte");
            return false;
        }
        pattern = (byte)v;
        return true;
    }

    private bool InRange(long offset, long count) => offset <= _disk.Size && _disk.Size - offset >= count;

    private bool Read(string[] argv)
    {
        if (!ParseOptions("read", argv, "bCl:pP:qs:v", out var o))
        {
            return false;
        }
        byte pattern = 0;
        long patternOffset = 0;
        long patternCount = 0;
        var pFlag = o.Has("P");
        if (pFlag && !Pattern(o.Get("P")!, out pattern))
        {
            return false;
        }
        if (o.Get("l") is { } l && !Number(l, out patternCount))
        {
            return false;
        }
        if (o.Get("s") is { } so && !Number(so, out patternOffset))
        {
            return false;
        }
        if (!Number(o.Operands[0], out var offset) || !Number(o.Operands[1], out var count))
        {
            return false;
        }
        if (count > MaxRequest)
        {
            _out.WriteLine($"length cannot exceed {MaxRequest}, given {o.Operands[1]}");
            return false;
        }
        if (!pFlag && (o.Has("l") || o.Has("s")))
        {
            Usage("read");
            return false;
        }
        if (!o.Has("l"))
        {
            patternCount = count - patternOffset;
        }
        if (patternCount < 0 || patternCount + patternOffset > count)
        {
            _out.WriteLine("pattern verification range exceeds end of read data");
            return false;
        }
        if (o.Has("b"))
        {
            _out.WriteLine("read failed: Operation not supported");
            return false;
        }
        var buffer = new byte[count];
        buffer.AsSpan().Fill(0xab);
        var sw = Stopwatch.StartNew();
        if (!Attempt("read", offset, count, () =>
        {
            _disk.Read(offset, buffer);
            return true;
        }))
        {
            return false;
        }
        sw.Stop();
        var ok = true;
        if (pFlag && buffer.AsSpan((int)patternOffset, (int)patternCount).ContainsAnyExcept(pattern))
        {
            _out.WriteLine($"Pattern verification failed at offset {offset + patternOffset}, {patternCount} bytes");
            ok = false;
        }
        if (o.Has("q"))
        {
            return ok;
        }
        if (o.Has("v"))
        {
            DumpBuffer(buffer, offset);
        }
        Report("read", sw.Elapsed, offset, count, count, o.Has("C"));
        return ok;
    }

    private bool Write(string[] argv)
    {
        if (!ParseOptions("write", argv, "bcCfnpP:quzs:", out var o))
        {
            return false;
        }
        byte pattern = 0xcd;
        var pFlag = o.Has("P");
        if (pFlag && !Pattern(o.Get("P")!, out pattern))
        {
            return false;
        }
        var zFlag = o.Has("z");
        var sFlag = o.Has("s");
        if (o.Has("b") && zFlag)
        {
            _out.WriteLine("-b and -z cannot be specified at the same time");
            return false;
        }
        if (o.Has("f") && (o.Has("b") || o.Has("c")))
        {
            _out.WriteLine("-f and -b or -c cannot be specified at the same time");
            return false;
        }
        if (o.Has("n") && !zFlag)
        {
            _out.WriteLine("-n requires -z to be specified");
            return false;
        }
        if (o.Has("u") && !zFlag)
        {
            _out.WriteLine("-u requires -z to be specified");
            return false;
        }
        if ((zFlag ? 1 : 0) + (pFlag ? 1 : 0) + (sFlag ? 1 : 0) > 1)
        {
            _out.WriteLine("Only one of -z, -P, and -s can be specified at the same time");
            return false;
        }
        if (!Number(o.Operands[0], out var offset) || !Number(o.Operands[1], out var count))
        {
            return false;
        }
        if (count > MaxRequest && !o.Has("n"))
        {
            _out.WriteLine($"length cannot exceed {MaxRequest} without -n, given {o.Operands[1]}");
            return false;
        }
        var compressed = o.Has("c") && !zFlag;
        if (o.Has("b") || compressed && _disk is not QcowDisk)
        {
            _out.WriteLine("write failed: Operation not supported");
            return false;
        }
        byte[]? buffer = null;
        if (!zFlag)
        {
            buffer = new byte[count];
            if (sFlag)
            {
                if (!LoadSourceFile(o.Get("s")!, buffer))
                {
                    return false;
                }
            }
            else
            {
                buffer.AsSpan().Fill(pattern);
            }
        }
        var sw = Stopwatch.StartNew();
        if (!Attempt("write", offset, count, () =>
        {
            if (zFlag)
            {
                _disk.WriteZeroes(offset, count, o.Has("u"));
            }
            else if (compressed)
            {
                if (!WriteCompressed((QcowDisk)_disk, offset, buffer!))
                {
                    return false;
                }
            }
            else
            {
                _disk.Write(offset, buffer);
            }
            if (o.Has("f"))
            {
                _disk.Flush();
            }
            return true;
        }))
        {
            return false;
        }
        sw.Stop();
        if (!o.Has("q"))
        {
            Report("wrote", sw.Elapsed, offset, count, count, o.Has("C"));
        }
        return true;
    }

    /// <summary>
    /// write -c, with QEMU's refusals: whole clusters only (the image's last one may be partial), and
    /// never over a cluster that has a host offset (QEMU's compressed writes cannot overwrite).
    /// </summary>
    private bool WriteCompressed(QcowDisk disk, long offset, byte[] buffer)
    {
        var cs = disk.Image.ClusterSize;
        if (offset % cs != 0 || (buffer.Length % cs != 0 && offset + buffer.Length != disk.Size))
        {
            _out.WriteLine("write failed: Invalid argument");
            return false;
        }
        if (buffer.Length > 0 && disk.Image.GetMap(offset, buffer.Length).Any(e => e.HostOffset is not null || e.Kind == QcowExtentKind.Compressed))
        {
            _out.WriteLine("write failed: Input/output error");
            return false;
        }
        disk.WriteCompressed(offset, buffer);
        return true;
    }

    /// <summary>write -s: the buffer comes from a file, which must hold at least len bytes.</summary>
    private bool LoadSourceFile(string path, byte[] buffer)
    {
        try
        {
            using var f = File.OpenRead(path);
            var done = 0;
            while (done < buffer.Length)
            {
                var n = f.Read(buffer, done, buffer.Length - done);
                if (n == 0)
                {
                    ErrorLine($"Failed to read all bytes from {path}");
                    return false;
                }
                done += n;
            }
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            ErrorLine($"Failed to open pattern file {path}: {DiskOpener.Describe(e)}");
            return false;
        }
    }

    private bool Discard(string[] argv)
    {
        if (!ParseOptions("discard", argv, "Cq", out var o))
        {
            return false;
        }
        if (!Number(o.Operands[0], out var offset) || !Number(o.Operands[1], out var count))
        {
            return false;
        }
        if (count > MaxRequest)
        {
            _out.WriteLine($"length cannot exceed {MaxRequest}, given {o.Operands[1]}");
            return false;
        }
        var sw = Stopwatch.StartNew();
        if (!Attempt("discard", offset, count, () =>
        {
            _disk.Discard(offset, count);
            return true;
        }))
        {
            return false;
        }
        sw.Stop();
        if (!o.Has("q"))
        {
            Report("discard", sw.Elapsed, offset, count, count, o.Has("C"));
        }
        return true;
    }

    private bool Flush()
    {
        try
        {
            _disk.Flush();
            return true;
        }
        catch (IOException e)
        {
            ErrorLine($"flush failed: {e.Message}");
            return false;
        }
    }

    private bool Length()
    {
        _out.WriteLine(HumanUnits.Cvtstr(_disk.Size));
        return true;
    }

    private bool Help(string[] argv)
    {
        if (argv.Length > 1)
        {
            var c = Commands.FirstOrDefault(x => x.Name == argv[1] || x.Alias == argv[1]);
            if (c is null)
            {
                ErrorLine($"command {argv[1]} not found");
                return false;
            }
            _out.WriteLine($"{c.Name} {c.Args} -- {c.Summary}");
            return true;
        }
        foreach (var c in Commands)
        {
            _out.WriteLine($"{c.Name} {c.Args} -- {c.Summary}".Replace("  ", " ", StringComparison.Ordinal));
        }
        return true;
    }

    /// <summary>print_report: "op total/count bytes at offset N" and the rate line (or -C's CSV).</summary>
    private void Report(string op, TimeSpan elapsed, long offset, long count, long total, bool parsable)
    {
        var seconds = Math.Max(elapsed.TotalSeconds, 1e-9);
        if (parsable)
        {
            _out.WriteLine($"{total},1,{HumanUnits.Timestr(elapsed, true)},{CFormat.Fixed(total / seconds, 3)},{CFormat.Fixed(1 / seconds, 3)}");
            return;
        }
        _out.WriteLine($"{op} {total}/{count} bytes at offset {offset}");
        _out.WriteLine($"{HumanUnits.Cvtstr(total)}, 1 ops; {HumanUnits.Timestr(elapsed, false)} ({HumanUnits.Cvtstr(total / seconds)}/sec and {CFormat.Fixed(1 / seconds, 4)} ops/sec)");
    }

    /// <summary>dump_buffer: offset, 16 hex bytes, then the printable (alphanumeric) ones.</summary>
    private void DumpBuffer(byte[] buffer, long offset)
    {
        var sb = new StringBuilder();
        for (var i = 0; i < buffer.Length; i += 16)
        {
            sb.Clear();
            sb.Append((offset + i).ToString("x8", System.Globalization.CultureInfo.InvariantCulture)).Append(":  ");
            var n = Math.Min(16, buffer.Length - i);
            for (var j = 0; j < n; j++)
            {
                sb.Append(buffer[i + j].ToString("x2", System.Globalization.CultureInfo.InvariantCulture)).Append(' ');
            }
            sb.Append(' ');
            for (var j = 0; j < n; j++)
            {
                var c = (char)buffer[i + j];
                sb.Append(char.IsAsciiLetterOrDigit(c) ? c : '.');
            }
            _out.WriteLine(sb);
        }
    }

    /// <summary>
    /// One request as qemu-io runs it: out of the disk's range, or failing, it prints "VERB failed: …"
    /// and ends the command; <paramref name="io"/> returns false when it printed its own failure.
    /// </summary>
    private bool Attempt(string verb, long offset, long count, Func<bool> io)
    {
        if (!InRange(offset, count))
        {
            _out.WriteLine($"{verb} failed: Input/output error");
            return false;
        }
        try
        {
            return io();
        }
        catch (Exception e) when (e is IOException or NotSupportedException or InvalidOperationException)
        {
            _out.WriteLine($"{verb} failed: {e.Message}");
            return false;
        }
    }
}
