using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img compare: exit 0 identical, 1 different, 2 on errors; mismatches reported by 512-byte sector.</summary>
internal sealed class CompareCommand : Command
{
    private const int Sector = 512;
    private const int ChunkSize = 2 << 20;

    public override string Name => "compare";

    public override string Synopsis => "compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2";

    public override string Help => """
        Compares the guest-visible content of two images (any mix of formats). Unallocated ranges
        read as zeroes; images of different sizes are identical when the extra part is all zeroes.
          -f fmt, -F fmt   formats of the first and the second image (default: detected)
          -s               strict: sizes and allocation must match too
          -q               quiet
          -p               show progress
          -T cache         cache mode for both images
        Exit status: 0 identical, 1 different, 2 error.

        """;

    public override int FailureExitCode => 2;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("f:F:T:pqsU", ("image-opts", false), ("object", true), ("force-share", false)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var quiet = o.Has("q");
        var strict = o.Has("s");
        var cache = CacheMode.Parse(o.Get("T"), $"Invalid source cache option: {o.Get("T")}");
        if (o.Operands.Count != 2)
        {
            throw new CliException("Expecting two image file names");
        }
        using var a = DiskOpener.Open(o.Operands[0], o.Get("f"), writable: false, cache);
        using var b = DiskOpener.Open(o.Operands[1], o.Get("F"), writable: false, cache);
        var progress = new Progress(ctx, o.Has("p") && !quiet);
        var outcome = Compare(a, b, strict, progress, out var message);
        progress.Finish();
        if (!quiet)
        {
            foreach (var line in message)
            {
                ctx.Out.WriteLine(line);
            }
        }
        return outcome;
    }

    private static int Compare(Disk a, Disk b, bool strict, Progress progress, out List<string> lines)
    {
        lines = [];
        var sizeA = a.Size;
        var sizeB = b.Size;
        if (strict && sizeA != sizeB)
        {
            lines.Add("Strict mode: Image size mismatch!");
            return 1;
        }
        var common = Math.Min(sizeA, sizeB);
        var total = Math.Max(sizeA, sizeB);
        using var bufA = new AlignedBuffer(ChunkSize);
        using var bufB = new AlignedBuffer(ChunkSize);
        using (var ca = new StatusCursor(a, 0, common))
        using (var cb = new StatusCursor(b, 0, common))
        {
            for (long offset = 0; offset < common;)
            {
                var sa = ca.At(offset);
                var sb = cb.At(offset);
                var chunk = Math.Min(Math.Min(sa.End, sb.End), common) - offset;
                if (strict && Flags(sa, sizeA) != Flags(sb, sizeB))
                {
                    lines.Add($"Strict mode: Offset {offset} block status mismatch!");
                    return 1;
                }
                if (!(sa.Zero && sb.Zero))
                {
                    chunk = Math.Min(chunk, ChunkSize);
                    var n = (int)chunk;
                    long? diff;
                    if (sa.Zero || sb.Zero)
                    {
                        var other = sa.Zero ? b : a;
                        other.Read(offset, bufA.Memory.Span[..n]);
                        diff = FirstNonZeroSector(bufA.Memory.Span[..n]);
                    }
                    else
                    {
                        var ra = a.ReadAsync(offset, bufA.Memory[..n]);
                        b.Read(offset, bufB.Memory.Span[..n]);
                        ra.AsTask().GetAwaiter().GetResult();
                        diff = FirstDifferentSector(bufA.Memory.Span[..n], bufB.Memory.Span[..n]);
                    }
                    if (diff is { } d)
                    {
                        lines.Add($"Content mismatch at offset {offset + d}!");
                        return 1;
                    }
                }
                offset += chunk;
                progress.Advance(chunk * 100.0 / total);
            }
        }
        if (sizeA != sizeB)
        {
            lines.Add("Warning: Image size mismatch!");
            var over = sizeA > sizeB ? a : b;
            using var c = new StatusCursor(over, common, total);
            for (var offset = common; offset < total;)
            {
                var s = c.At(offset);
                var chunk = Math.Min(Math.Min(s.End, total) - offset, ChunkSize);
                if (!s.Zero)
                {
                    var span = bufA.Memory.Span[..(int)chunk];
                    over.Read(offset, span);
                    if (FirstNonZeroSector(span) is { } d)
                    {
                        lines.Add($"Content mismatch at offset {offset + d}!");
                        return 1;
                    }
                }
                offset += chunk;
                progress.Advance(chunk * 100.0 / total);
            }
        }
        lines.Add("Images are identical.");
        return 0;
    }

    /// <summary>The block-status bits qemu-img compare -s compares: allocated, zero, data, offset valid, EOF.</summary>
    private static int Flags(in BlockStatus s, long size)
        => (s.Present ? 1 : 0) | (s.Zero ? 2 : 0) | (s.Data ? 4 : 0) | (s.Offset.HasValue ? 8 : 0) | (s.End >= size ? 16 : 0);

    /// <summary>Offset of the first 512-byte sector that differs, as compare_buffers finds it.</summary>
    private static long? FirstDifferentSector(ReadOnlySpan<byte> x, ReadOnlySpan<byte> y)
    {
        var same = x.CommonPrefixLength(y);
        return same == x.Length ? null : same / Sector * Sector;
    }

    /// <summary>find_nonzero: offset of the first sector holding a non-zero byte.</summary>
    private static long? FirstNonZeroSector(ReadOnlySpan<byte> x)
    {
        var i = x.IndexOfAnyExcept((byte)0);
        return i < 0 ? null : i / Sector * Sector;
    }
}
