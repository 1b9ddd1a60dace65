using System.Buffers.Binary;
using System.Text;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Engine;

/// <summary>What every layer of one chain is opened with, carried down from the top image.</summary>
internal sealed class BackingContext
{
    public QcowBackingPolicy Policy { get; init; }

    /// <summary>Requested root for <see cref="QcowBackingPolicy.WithinRoot"/>; null: the top image's folder.</summary>
    public string? Root { get; init; }

    public bool ForceShare { get; init; }

    public QcowCacheMode CacheMode { get; init; }

    /// <summary>Depth of the image being opened: 0 for the top.</summary>
    public int Depth { get; private init; }

    /// <summary>Identities (device, inode) of every file of the chain so far.</summary>
    public HashSet<(ulong Dev, ulong Ino)> Seen { get; private init; } = [];

    /// <summary>Real path of the allowed folder, fixed when the top is opened.</summary>
    public string? RealRoot { get; set; }

    public BackingContext Below() => new()
    {
        Policy = Policy,
        Root = Root,
        ForceShare = ForceShare,
        CacheMode = CacheMode,
        Depth = Depth + 1,
        Seen = Seen,
        RealRoot = RealRoot,
    };
}

/// <summary>
/// One image under another: a qcow2 image (itself opened read-only with its own chain) or a raw file.
/// Reads past its virtual size return zeroes, as QEMU's do for a backing file shorter than its overlay.
/// </summary>
internal sealed class BackingLayer : IDisposable
{
    private BackingLayer(string path, string format, QcowCore? qcow, ImageStorage? raw)
    {
        Path = path;
        Format = format;
        Qcow = qcow;
        Raw = raw;
    }

    /// <summary>The path it was opened by (QEMU's full backing filename).</summary>
    public string Path { get; }

    /// <summary>"qcow2" or "raw".</summary>
    public string Format { get; }

    public QcowCore? Qcow { get; }

    public ImageStorage? Raw { get; }

    /// <summary>Virtual size: a raw file's length rounded up to whole sectors, as QEMU sees it.</summary>
    public long Size => Qcow?.Size ?? (Raw!.Length + QcowHeader.SectorSize - 1) & ~(long)(QcowHeader.SectorSize - 1);

    public void Read(long offset, Span<byte> buffer)
    {
        var n = (int)Math.Clamp(Size - offset, 0, buffer.Length);
        if (n > 0)
        {
            if (Qcow is not null)
            {
                Qcow.Read(offset, buffer[..n]);
            }
            else
            {
                Raw!.Read(offset, buffer[..n]);
            }
        }
        buffer[n..].Clear();
    }

    public async ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken ct)
    {
        var n = (int)Math.Clamp(Size - offset, 0, buffer.Length);
        if (n > 0)
        {
            if (Qcow is not null)
            {
                await Qcow.ReadAsync(offset, buffer[..n], ct).ConfigureAwait(false);
            }
            else
            {
                await Raw!.ReadAsync(offset, buffer[..n], ct).ConfigureAwait(false);
            }
        }
        buffer.Span[n..].Clear();
    }

    public void Dispose()
    {
        Qcow?.Dispose();
        Raw?.Dispose();
    }

    /// <summary>QEMU's path_has_protocol: a colon before the first slash ("nbd:…", "json:{…}").</summary>
    public static bool HasProtocol(string name)
    {
        var i = name.AsSpan().IndexOfAny(':', '/');
        return i >= 0 && name[i] == ':';
    }

    /// <summary>QEMU's path_combine: a relative name is relative to the folder of the image naming it (as that image was named).</summary>
    public static string Combine(string? imagePath, string name)
    {
        if (System.IO.Path.IsPathRooted(name) || imagePath is null)
        {
            return name;
        }
        var slash = imagePath.LastIndexOf('/');
        return slash < 0 ? name : imagePath[..(slash + 1)] + name;
    }

    /// <summary>Identity of the top image's file, so that a chain coming back to it is found.</summary>
    public static void NoteTop(string? topPath, BackingContext ctx)
    {
        if (topPath is not null && NativeMethods.Identity(topPath) is { } id)
        {
            ctx.Seen.Add((id.Dev, id.Ino));
        }
    }

    /// <summary>Opens the backing file <paramref name="name"/> of <paramref name="image"/> under the context's policy.</summary>
    public static BackingLayer Open(string? image, string name, string? format, BackingContext ctx)
    {
        var depth = ctx.Depth + 1;
        if (ctx.Policy == QcowBackingPolicy.Refuse)
        {
            Fail(image, name, QcowBackingError.Refused, "the image has a backing file, and the open options refuse backing files");
        }
        if (HasProtocol(name))
        {
            Fail(image, name, QcowBackingError.Protocol, $"backing file '{name}' names a protocol or json: description; only plain files are supported as backing files");
        }
        if (depth > QcowImage.MaxBackingDepth)
        {
            Fail(image, name, QcowBackingError.TooDeep, $"the backing chain is deeper than {QcowImage.MaxBackingDepth} images");
        }
        if (format is not (null or "qcow2" or "raw"))
        {
            Fail(image, name, QcowBackingError.Format, $"backing file format '{format}' is not supported (qcow2 and raw are)");
        }
        if (image is null && !System.IO.Path.IsPathRooted(name))
        {
            Fail(image, name, QcowBackingError.NotFound, $"the relative backing file name '{name}' cannot be resolved: the image has no path");
        }
        var path = Combine(image, name);
        if (ctx.Policy == QcowBackingPolicy.WithinRoot)
        {
            // Judged on the real path before anything is opened: a hostile image must not make us open
            // (or even probe) a device, a FIFO or a file outside the root, through a link or "..".
            var real = NativeMethods.RealPath(path);
            if (real is not null && !IsInside(real, ctx.RealRoot))
            {
                Fail(image, name, QcowBackingError.Refused, $"backing file '{path}' lies outside the allowed folder '{ctx.RealRoot}'");
            }
        }
        if (NativeMethods.Identity(path) is { Regular: false })
        {
            Fail(image, name, QcowBackingError.NotFound, $"Could not open backing file: '{path}' is not a regular file");
        }
        FileStorage storage;
        try
        {
            storage = FileStorage.Open(path, writable: false);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            var why = e is FileNotFoundException or DirectoryNotFoundException ? "No such file or directory" : e is UnauthorizedAccessException ? "Permission denied" : e.Message;
            throw new QcowBackingFileException($"Could not open backing file: Could not open '{path}': {why}", image, name, QcowBackingError.NotFound, e);
        }
        try
        {
            if (NativeMethods.Identity(storage.Handle) is { } id)
            {
                if (!id.Regular)
                {
                    Fail(image, name, QcowBackingError.NotFound, $"Could not open backing file: '{path}' is not a regular file");
                }
                if (!ctx.Seen.Add((id.Dev, id.Ino)))
                {
                    Fail(image, name, QcowBackingError.Loop, $"backing file '{path}' is already in the chain (a loop of backing files)");
                }
            }
            if (ctx.Policy == QcowBackingPolicy.WithinRoot && NativeMethods.OpenedPath(storage.Handle) is { } opened && !IsInside(opened, ctx.RealRoot))
            {
                // The file was swapped for a link between the check and the open.
                Fail(image, name, QcowBackingError.Refused, $"backing file '{path}' lies outside the allowed folder '{ctx.RealRoot}'");
            }
            if (!ctx.ForceShare)
            {
                storage.Lock(writable: false);
            }
            Span<byte> magic = stackalloc byte[4];
            storage.Read(0, magic);
            var isQcow = storage.Length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(magic) == QcowHeader.Magic;
            var fmt = format ?? (isQcow ? "qcow2" : "raw");
            if (fmt == "qcow2")
            {
                if (!isQcow)
                {
                    Fail(image, name, QcowBackingError.Format, $"Could not open backing file: '{path}' is not in qcow2 format");
                }
                var core = QcowCore.Open(storage, readOnly: true, backing: ctx.Below());
                return new BackingLayer(path, fmt, core, null);
            }
            return new BackingLayer(path, fmt, null, storage);
        }
        catch
        {
            storage.Dispose();
            throw;
        }
    }

    private static bool IsInside(string real, string? root)
    {
        if (root is null)
        {
            return false;
        }
        var r = root.EndsWith('/') ? root : root + "/";
        return real.StartsWith(r, StringComparison.Ordinal);
    }

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private static void Fail(string? image, string name, QcowBackingError reason, string message)
        => throw new QcowBackingFileException($"{image ?? "image"}: {message}", image, name, reason);

    /// <summary>Reads the backing file name and the backing format extension of an image's header.</summary>
    public static (string? Name, string? Format) ReadNames(ImageStorage file, QcowHeader h)
    {
        string? format = null;
        var ext = h.Extensions.FirstOrDefault(e => e.Type == HeaderExtension.BackingFormat);
        if (ext is not null)
        {
            if (ext.Data.Length >= 16)
            {
                // QEMU's bs->backing_format is 16 bytes with the terminator.
                ThrowHelper.Corrupt(file.Name, ext.Offset + 4, "backing format extension", $"ext_backing_format: len={ext.Data.Length} too large (>=16)");
            }
            // A C string for QEMU: whatever follows a NUL is not part of it.
            var end = Array.IndexOf(ext.Data, (byte)0);
            format = Encoding.UTF8.GetString(end < 0 ? ext.Data : ext.Data.AsSpan(0, end));
        }
        if (h.BackingFileOffset == 0 || h.BackingFileSize == 0)
        {
            return (null, format);
        }
        var raw = new byte[h.BackingFileSize];
        file.Read((long)h.BackingFileOffset, raw);
        var nul = Array.IndexOf(raw, (byte)0);
        return (Encoding.UTF8.GetString(nul < 0 ? raw : raw.AsSpan(0, nul)), format);
    }
}
