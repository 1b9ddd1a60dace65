namespace QcowTier.Heat.Render;

internal readonly record struct Rgb(byte R, byte G, byte B)
{
    public static Rgb Hex(int rgb) => new((byte)(rgb >> 16), (byte)(rgb >> 8), (byte)rgb);

    public static Rgb Lerp(Rgb a, Rgb b, double t) => new(
        (byte)Math.Round(a.R + (b.R - a.R) * t),
        (byte)Math.Round(a.G + (b.G - a.G) * t),
        (byte)Math.Round(a.B + (b.B - a.B) * t));
}

/// <summary>An RGB raster with the few drawing operations the heat pictures need.</summary>
internal sealed class Canvas
{
    public const int MaxSide = 8192;

    private readonly byte[] _pixels;

    public Canvas(int width, int height, Rgb background)
    {
        if (width is < 1 or > MaxSide || height is < 1 or > MaxSide)
        {
            throw new ArgumentOutOfRangeException(nameof(width), $"{width}×{height} is outside 1..{MaxSide} pixels a side");
        }
        Width = width;
        Height = height;
        _pixels = new byte[width * height * 3];
        Fill(0, 0, width, height, background);
    }

    public int Width { get; }

    public int Height { get; }

    public ReadOnlySpan<byte> Row(int y) => _pixels.AsSpan(y * Width * 3, Width * 3);

    public Rgb Get(int x, int y)
    {
        var i = (y * Width + x) * 3;
        return new Rgb(_pixels[i], _pixels[i + 1], _pixels[i + 2]);
    }

    public void Set(int x, int y, Rgb c)
    {
        if ((uint)x >= (uint)Width || (uint)y >= (uint)Height)
        {
            return;
        }
        var i = (y * Width + x) * 3;
        _pixels[i] = c.R;
        _pixels[i + 1] = c.G;
        _pixels[i + 2] = c.B;
    }

    public void Fill(int x, int y, int w, int h, Rgb c)
    {
        var x0 = Math.Max(0, x);
        var y0 = Math.Max(0, y);
        var x1 = Math.Min(Width, x + w);
        var y1 = Math.Min(Height, y + h);
        for (var yy = y0; yy < y1; yy++)
        {
            for (var xx = x0; xx < x1; xx++)
            {
                Set(xx, yy, c);
            }
        }
    }

    public void Rect(int x, int y, int w, int h, Rgb c)
    {
        Fill(x, y, w, 1, c);
        Fill(x, y + h - 1, w, 1, c);
        Fill(x, y, 1, h, c);
        Fill(x + w - 1, y, 1, h, c);
    }

    /// <summary>A line <paramref name="thickness"/> pixels wide; dashed when <paramref name="dash"/> &gt; 0.</summary>
    public void Line(int x0, int y0, int x1, int y1, Rgb c, int thickness = 1, int dash = 0)
    {
        int dx = Math.Abs(x1 - x0), sx = x0 < x1 ? 1 : -1;
        int dy = -Math.Abs(y1 - y0), sy = y0 < y1 ? 1 : -1;
        var err = dx + dy;
        var lo = -(thickness - 1) / 2;
        var step = 0;
        while (true)
        {
            if (dash <= 0 || (step / dash) % 2 == 0)
            {
                Fill(x0 + lo, y0 + lo, thickness, thickness, c);
            }
            step++;
            if (x0 == x1 && y0 == y1)
            {
                return;
            }
            var e2 = 2 * err;
            if (e2 >= dy)
            {
                err += dy;
                x0 += sx;
            }
            if (e2 <= dx)
            {
                err += dx;
                y0 += sy;
            }
        }
    }

    public static int TextWidth(string text, int scale) => text.Length == 0 ? 0 : (text.Length * (BitmapFont.Width + 1) - 1) * scale;

    public static int TextHeight(int scale) => BitmapFont.Height * scale;

    /// <summary>Draws text with its top-left corner at (x, y).</summary>
    public void Text(int x, int y, string text, Rgb c, int scale = 1)
    {
        foreach (var ch in text)
        {
            var glyph = BitmapFont.Glyph(ch);
            for (var row = 0; row < BitmapFont.Height; row++)
            {
                for (var col = 0; col < BitmapFont.Width; col++)
                {
                    if ((glyph[row] & (0x10 >> col)) != 0)
                    {
                        Fill(x + col * scale, y + row * scale, scale, scale, c);
                    }
                }
            }
            x += (BitmapFont.Width + 1) * scale;
        }
    }

    /// <summary>Draws text turned a quarter left (read bottom to top), its first character's bottom-left at (x, y).</summary>
    public void TextUp(int x, int y, string text, Rgb c, int scale = 1)
    {
        foreach (var ch in text)
        {
            var glyph = BitmapFont.Glyph(ch);
            for (var row = 0; row < BitmapFont.Height; row++)
            {
                for (var col = 0; col < BitmapFont.Width; col++)
                {
                    if ((glyph[row] & (0x10 >> col)) != 0)
                    {
                        Fill(x + row * scale, y - (col + 1) * scale, scale, scale, c);
                    }
                }
            }
            y -= (BitmapFont.Width + 1) * scale;
        }
    }
}
